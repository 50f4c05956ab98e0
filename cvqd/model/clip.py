"""CLIP conditioning through open_clip: build by name or config, load user weights, embed, pseudo text.

Nothing is ever downloaded: a CLIP is built from its architecture (an open_clip model name or a config
dict carried in the checkpoint) and its weights come from the checkpoint (small CLIPs) or from a file
the user passes (`load_clip_weights`). All embeddings are L2-normalised.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.model.config import ClipConfig
from cvqd.errors import CheckpointError, ConfigError


def build_clip(cfg: ClipConfig) -> nn.Module:
    """An open_clip CLIP with random weights, from `cfg.model_cfg` or the built-in `cfg.model_name`."""
    import open_clip

    if cfg.model_cfg is not None:
        model = open_clip.CLIP(**cfg.model_cfg)
    else:
        if open_clip.get_model_config(cfg.model_name) is None:
            raise ConfigError(f"unknown open_clip model {cfg.model_name!r}; "
                              f"expected one of open_clip.list_models(), e.g. 'ViT-B-32'")
        model = open_clip.create_model(cfg.model_name, pretrained=None)
    if getattr(model, "embed_dim", cfg.embed_dim) != cfg.embed_dim:
        raise ConfigError(f"CLIP {cfg.model_name!r} has embedding width {model.embed_dim}, config says {cfg.embed_dim}")
    return model.eval()


def clip_state_from_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a user file: open_clip checkpoints ({"state_dict": ...} or plain) or OpenAI's.

    OpenAI's released files are TorchScript archives; their weights are read with `torch.jit.load` on the CPU
    (no Python objects are unpickled) and mapped to open_clip's layout.
    """
    from cvqd.model.checkpoint import load_state_file

    return load_state_file(path, "CLIP weights", torchscript=True)


def load_clip_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load `state` into `model`, with a one-line error naming what does not fit."""
    drop = {"input_resolution", "context_length", "vocab_size"}  # OpenAI TorchScript extras
    state = {k: v for k, v in state.items() if k not in drop}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"CLIP weights from {source} do not fit the configured architecture "
                              f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")


class ClipEncoder(nn.Module):
    """Tokenise, embed text and images; every output is L2-normalised [B, D]."""

    def __init__(self, cfg: ClipConfig, model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else build_clip(cfg)
        self._tokenizer = None

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """-> token ids [B, context_length] int64 (open_clip's tokenizer; long prompts are cut)."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.cfg.tokenizer, context_length=self.cfg.context_length)
        return self._tokenizer(list(prompts)).to(next(self.model.parameters()).device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> CLIP input [B, 3, S, S] (resize, CLIP mean/std)."""
        return clip_preprocess(images, self.cfg.image_size, self.cfg.image_mean, self.cfg.image_std)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> [B, D]."""
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)


def clip_preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> CLIP input [B, 3, S, S]: bicubic antialiased resize to S = size, CLIP
    mean/std. Training, `cvqd-eval` and every runtime backend (before the plan's clip_image graph) use this one."""
    x = (images.float() + 1) / 2
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def open_clip_embed_dim(name: str) -> int:
    """The embedding width of an open_clip architecture, from its config (no weights are built or loaded)."""
    import open_clip

    mc = open_clip.get_model_config(name)
    if mc is None:
        raise ConfigError(f"unknown open_clip model {name!r}; expected a name from open_clip.list_models(), "
                          f"e.g. ViT-B-32")
    return int(mc["embed_dim"])


def clip_image_size(clip: nn.Module, default: int) -> int:
    """The input resolution of a built open_clip model's vision tower (`default` if it does not say)."""
    size = getattr(getattr(clip, "visual", None), "image_size", default)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def pseudo_text_embedding(image_emb: torch.Tensor, alpha: float, generator: torch.Generator | None = None,
                          shaped: tuple[float, torch.Tensor] | None = None) -> torch.Tensor:
    """LAFITE/clip2latent pseudo text embedding: normalise(f_img + alpha * eps/|eps|), eps ~ N(0, I).

    The angle to the image embedding is at most arcsin(alpha) (docs/algorithm.md#pseudo-text-embedding).
    image_emb [B, D] -> [B, D], L2-normalised. `shaped = (beta, A)` mixes in noise
    shaped like the image embeddings: eps = sqrt(1 - beta) n/|n| + sqrt(beta) (m A)/|m A|, with n, m ~ N(0, I)
    and A a square root of their covariance (see `embedding_noise_factor`); beta = 0 is the isotropic recipe.
    """
    eps = torch.randn(image_emb.shape, generator=generator, device=image_emb.device, dtype=image_emb.dtype)
    if shaped is not None and shaped[0] > 0:
        beta, factor = shaped
        # m [B, rows of A]: A is [min(N, D), D], so fewer images N than dimensions D still shape the noise
        m = torch.randn((image_emb.shape[0], factor.shape[0]), generator=generator, device=image_emb.device,
                        dtype=image_emb.dtype)
        eps = (1 - beta) ** 0.5 * F.normalize(eps, dim=-1) + beta ** 0.5 * F.normalize(m @ factor.to(m), dim=-1)
    return F.normalize(F.normalize(image_emb, dim=-1) + alpha * F.normalize(eps, dim=-1), dim=-1)


def embedding_noise_factor(embeds: torch.Tensor) -> torch.Tensor:
    """A [min(N, D), D] with A^T A = covariance of the (normalised) image embeddings [N, D]: z @ A ~ N(0, cov).

    A CLIP's text embedding tends to differ from its image's inside the few directions along which the image
    embeddings themselves vary, where isotropic noise puts only a small share of its norm; noise shaped like
    the images trains the generator on the kind of perturbation text brings. Needs only image embeddings.
    A = diag(s / sqrt(N - 1)) V^T from the thin SVD of the centred embeddings (docs/algorithm.md#pseudo-text-embedding).
    """
    e = F.normalize(embeds.double(), dim=-1)
    e = e - e.mean(0)
    _, s, vh = torch.linalg.svd(e, full_matrices=False)
    return ((s / (len(e) - 1) ** 0.5)[:, None] * vh).float()
