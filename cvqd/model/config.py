"""One dataclass config per component, saved inside every checkpoint and plan manifest.

Nothing about a model is inferred from file names: `ModelConfig.to_dict()` goes into the artefact and
`ModelConfig.from_dict()` rebuilds it. Presets by name (`preset("paper" | "demo" | "tiny")`):

- paper: the reference configuration (docs/algorithm.md#reference-configuration): 256x256 images, 16x16 tokens,
  K = 4096, 24 blocks x 512, 16 heads, 3x3 conv MLP 512->2048->512, CLIP ViT-B/32, T = 100. About 515M
  transformer parameters.
- demo:  a small model for 64x64 images that trains from nothing on two CPU cores in under an hour (the
         bundled model).
- tiny:  for tests; every shape is small, T is short.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cvqd.errors import ConfigError

# CLIP image normalisation (OpenAI's dataset statistics; open_clip uses the same for ViT-B-32).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class _Config:
    """Dict round trip with strict keys; lists from JSON become tuples where the field is a tuple."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(names)}")
        kwargs = {}
        for key, value in d.items():
            default = _default_of(names[key])
            kwargs[key] = _tuplify(value) if isinstance(default, tuple) else value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a value of the wrong kind reaching __post_init__ arithmetic
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def _plain(v: Any) -> Any:
    """Tuples -> lists so a config dict is JSON- and `torch.load(weights_only=True)`-friendly."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


ENCODER_SCOPES = ("image", "cell")  # VQGANConfig.encoder_scope: what one token's code is computed from
LR_SCHEDULES = ("cosine", "constant")  # the diffusion trainer's learning rate after warm-up


@dataclass
class VQGANConfig(_Config):
    """Taming-style Gumbel-VQGAN: encoder/decoder widths, codebook, quantizer and discriminator."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 4096  # K, the codebook size
    norm_groups: int = 32
    kl_weight: float = 5e-5  # weight of KL(q(z|x) || uniform) on the Gumbel logits
    temp_init: float = 0.9  # Gumbel-softmax temperature, cosine-annealed to temp_final
    temp_final: float = 0.01
    disc_layers: int = 3  # PatchGAN depth
    disc_ch: int = 64
    disc_start: int = 25_000  # generator steps before the adversarial loss switches on
    disc_weight: float = 0.8
    # What one token's code is computed from: "image" (taming: the encoder runs on the whole image, so every token
    # sees all of it through the convolutions, the mid-block attention and GroupNorm statistics) or "cell" (the
    # encoder runs on each downsample x downsample cell alone, so a code describes only its own pixels). Only the
    # encoder differs; the decoder, which the runtime uses, is the same either way.
    encoder_scope: str = "image"
    # ResNet blocks per decoder level; None: num_res_blocks + 1 (taming's decoder). The decoder is over half of a
    # small VQGAN's training step (the demo VQGAN's 64x64 level alone ~a fifth of it on a CPU core).
    decoder_res_blocks: int | None = None

    def __post_init__(self) -> None:
        _require(self.resolution > 0 and self.ch > 0 and self.n_embed > 1, "VQGAN: sizes must be positive")
        _require(self.encoder_scope in ENCODER_SCOPES,
                 f"VQGAN: encoder_scope must be one of {list(ENCODER_SCOPES)}, got {self.encoder_scope!r}")
        _require(len(self.ch_mult) >= 1, "VQGAN: ch_mult needs at least one level")
        _require(self.decoder_res_blocks is None or self.decoder_res_blocks >= 1,
                 f"VQGAN: decoder_res_blocks must be >= 1 (or None for num_res_blocks + 1), got {self.decoder_res_blocks}")
        _require(self.resolution % self.downsample == 0,
                 f"VQGAN: resolution {self.resolution} is not divisible by the downsampling {self.downsample}")
        for c in {self.ch * m for m in self.ch_mult} | {self.ch}:
            _require(c % self.norm_groups == 0, f"VQGAN: width {c} is not divisible by norm_groups {self.norm_groups}")
        _require(0 < self.temp_final <= self.temp_init, "VQGAN: need 0 < temp_final <= temp_init")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_grid(self) -> tuple[int, int]:
        s = self.resolution // self.downsample
        return (s, s)


@dataclass
class TransformerConfig(_Config):
    """The diffusion transformer (docs/algorithm.md#model): no cross-attention; AdaLN_t on attention, AdaLN_clip
    on MLP."""

    num_classes: int = 4096  # K real token classes; the mask id is K
    grid: tuple[int, int] = (16, 16)  # token grid (H, W); N = H * W
    width: int = 512
    depth: int = 24
    heads: int = 16
    mlp: str = "conv"  # "conv": 3x3 Conv2d MLP on the grid (reference); "linear": a token-wise MLP
    mlp_hidden: int = 2048
    mlp_kernel: int = 3
    cond_dim: int = 512  # CLIP embedding width (projected inside AdaLN_clip)
    num_steps: int = 100  # T, size of the timestep embedding table

    def __post_init__(self) -> None:
        _require(self.width % self.heads == 0, f"transformer: width {self.width} not divisible by heads {self.heads}")
        _require(self.mlp in ("conv", "linear"), f"transformer: mlp must be 'conv' or 'linear', got {self.mlp!r}")
        _require(self.mlp_kernel % 2 == 1, "transformer: mlp_kernel must be odd")
        _require(self.num_classes > 1 and self.num_steps > 0 and self.depth > 0, "transformer: sizes must be positive")

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class ARConfig(_Config):
    """The CLIP-GEN generator (docs/algorithm.md#autoregressive-generator-clip-gen): a decoder-only transformer over
    the N tokens in raster order. The CLIP embedding enters as `prefix` positions (Linear(D -> prefix * width)) in
    front of the tokens; each block is x + Attn(LN(x)) (causal), x + MLP(LN(x)); the head is LN -> Linear(width -> K).

    Sequence: [c_1 .. c_P, x_1 .. x_{N-1}] -> logits of x_1 .. x_N (position P - 1 + n predicts token n)."""

    num_classes: int = 4096  # K: the VQGAN's codebook
    grid: tuple[int, int] = (16, 16)  # token grid (H, W); N = H * W, generated row by row
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 4096
    cond_dim: int = 512  # CLIP embedding width
    prefix: int = 1  # condition positions in front of the tokens

    def __post_init__(self) -> None:
        _require(self.width % self.heads == 0, f"ar: width {self.width} not divisible by heads {self.heads}")
        _require(self.num_classes > 1 and self.depth > 0 and self.prefix >= 1 and self.mlp_hidden > 0,
                 "ar: sizes must be positive (prefix >= 1)")

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cache_len(self) -> int:
        """Positions whose keys/values a decode step can attend to: the prefix and tokens 1 .. N-1."""
        return self.prefix + self.seq_len - 1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


GENERATORS = ("diffusion", "ar")


@dataclass
class DiffusionConfig(_Config):
    """Mask-and-replace schedule (docs/algorithm.md#schedule) and the loss settings that go with it."""

    num_steps: int = 100
    att_1: float = 0.99999
    att_T: float = 0.000009
    ctt_1: float = 0.000009
    ctt_T: float = 0.99999
    aux_weight: float = 5e-4  # auxiliary KL(onehot(x0) || p(x0|xt)) weight, times (2 - t/T)
    adaptive_aux: bool = True
    mask_weight: tuple[float, float] = (1.0, 1.0)  # KL weight on masked / unmasked positions
    importance_sampling: bool = True  # p_t ~ sqrt(EMA L_t^2) once every t was seen > 10 times

    def __post_init__(self) -> None:
        _require(self.num_steps >= 2, "diffusion: num_steps must be >= 2")
        _require(self.aux_weight >= 0, f"diffusion: aux_weight must be >= 0, got {self.aux_weight}")
        for a, c in ((self.att_1, self.ctt_1), (self.att_T, self.ctt_T)):
            _require(0 < a <= 1 and 0 <= c < 1 and a + c <= 1, "diffusion: need 0 < att, 0 <= ctt, att + ctt <= 1")
        _require(self.att_T < self.att_1 and self.ctt_T > self.ctt_1,
                 "diffusion: abar must decrease and gbar increase over time")


@dataclass
class ClipConfig(_Config):
    """CLIP conditioning: which open_clip model, its tokenizer and preprocessing, and the language-free terms."""

    model_name: str = "ViT-B-32"  # an open_clip architecture name, or a label for `model_cfg`
    model_cfg: dict[str, Any] | None = None  # an open_clip model config (custom small CLIPs); None: built-in name
    embed_dim: int = 512
    context_length: int = 77
    tokenizer: str = "ViT-B-32"  # open_clip tokenizer name
    image_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # pseudo text embedding: h = f_img + alpha * eps/|eps| (docs/algorithm.md#pseudo-text-embedding)
    noise_alpha: float = 0.25
    null_prob: float = 0.1  # CFG fine-tune: probability of replacing the condition by the null embedding

    def __post_init__(self) -> None:
        _require(self.embed_dim > 0 and self.context_length > 0, "clip: sizes must be positive")
        _require(0 <= self.noise_alpha < 1, f"clip: noise_alpha must be in [0, 1), got {self.noise_alpha}")
        _require(0 <= self.null_prob < 1, f"clip: null_prob must be in [0, 1), got {self.null_prob}")


@dataclass
class SamplingConfig(_Config):
    """Default inference settings saved with the model (chosen for it; the CLI can override each)."""

    steps: int = 100
    guidance: float = 3.0
    truncation: float = 0.9
    best_of: int = 1  # candidates per image, reranked by CLIP score (the official `times`)
    # True: the null condition is the learned null embedding L2-normalised, as training feeds it. False: used raw,
    # as the official CLIP-VQDiffusion inference does (converted official models, to reproduce their samples).
    normalize_null: bool = True
    # (low, high): the guidance scales the model's prompt-following was validated at (a recipe's measured sweep);
    # `cvqd-run` warns outside it. Empty: not measured.
    guidance_range: tuple[float, ...] = ()
    # Autoregressive models only (ModelConfig.ar): the token distribution is divided by the temperature (0: greedy),
    # then cut to the top_k classes (0: all) and to the smallest set holding top_p of the mass (1: all).
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "sampling: steps must be >= 1")
        _require(0 <= self.temperature <= 10, f"sampling: temperature must be in [0, 10], got {self.temperature}")
        _require(self.top_k >= 0, f"sampling: top_k must be >= 0 (0 = all classes), got {self.top_k}")
        _require(0 < self.top_p <= 1, f"sampling: top_p must be in (0, 1], got {self.top_p}")
        _require(self.guidance_range == () or (len(self.guidance_range) == 2
                                                and 0 <= self.guidance_range[0] <= self.guidance_range[1]),
                 f"sampling: guidance_range must be empty or (low, high) with 0 <= low <= high, got "
                 f"{self.guidance_range}")
        _require(0 < self.truncation <= 1, "sampling: truncation must be in (0, 1]")
        _require(self.best_of >= 1, f"sampling: best_of must be >= 1, got {self.best_of}")


@dataclass
class ModelConfig(_Config):
    """Everything needed to rebuild a model; cross-component sizes are checked here.

    `ar` None: a CLIP-VQDiffusion model (the diffusion transformer generates the tokens). `ar` set: a CLIP-GEN model
    whose autoregressive transformer generates them; it shares the VQGAN, the CLIP and the sampling defaults' layout,
    and its `transformer`/`diffusion` sections are those of the model it was trained beside (kept for the record;
    nothing runs them)."""

    preset: str = "custom"
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ar: ARConfig | None = None

    @property
    def generator(self) -> str:
        """ "diffusion" or "ar": which network makes the tokens."""
        return "diffusion" if self.ar is None else "ar"

    def __post_init__(self) -> None:
        v, t, d, c, s = self.vqgan, self.transformer, self.diffusion, self.clip, self.sampling
        if self.ar is not None:
            a = self.ar
            _require(a.num_classes == v.n_embed, f"ar.num_classes {a.num_classes} != vqgan.n_embed {v.n_embed}")
            _require(tuple(a.grid) == v.token_grid, f"ar.grid {a.grid} != VQGAN token grid {v.token_grid}")
            _require(a.cond_dim == c.embed_dim, f"ar.cond_dim {a.cond_dim} != clip.embed_dim {c.embed_dim}")
            _require(s.top_k <= a.num_classes, f"sampling.top_k {s.top_k} > ar.num_classes {a.num_classes}")
        _require(t.num_classes == v.n_embed, f"transformer.num_classes {t.num_classes} != vqgan.n_embed {v.n_embed}")
        _require(tuple(t.grid) == v.token_grid, f"transformer.grid {t.grid} != VQGAN token grid {v.token_grid}")
        _require(t.num_steps == d.num_steps, f"transformer.num_steps {t.num_steps} != diffusion.num_steps {d.num_steps}")
        _require(t.cond_dim == c.embed_dim, f"transformer.cond_dim {t.cond_dim} != clip.embed_dim {c.embed_dim}")
        _require(s.steps <= d.num_steps, f"sampling.steps {s.steps} > diffusion.num_steps {d.num_steps}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["ar"] is None:  # diffusion models: the same dict as before autoregressive models existed
            del d["ar"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"ModelConfig: expected a mapping, got {type(d).__name__}")
        parts = {"vqgan": VQGANConfig, "transformer": TransformerConfig, "diffusion": DiffusionConfig,
                 "clip": ClipConfig, "sampling": SamplingConfig}
        unknown = sorted(set(d) - set(parts) - {"preset", "ar"})
        if unknown:
            raise ConfigError(f"ModelConfig: unknown keys {unknown}")
        kwargs: dict[str, Any] = {k: parts[k].from_dict(d[k]) for k in parts if k in d}
        if d.get("ar") is not None:
            kwargs["ar"] = ARConfig.from_dict(d["ar"])
        return cls(preset=str(d.get("preset", "custom")), **kwargs)


# --------------------------------------------------------------------------------------------- presets

def _paper() -> ModelConfig:
    return ModelConfig(preset="paper")  # every default above is the paper's value


def _tiny_clip_cfg(embed: int, width: int, image_size: int, patch: int) -> dict[str, Any]:
    # An open_clip CLIP config; the BPE vocabulary stays full size so any prompt tokenises.
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": width, "head_width": width // 2,
                       "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1},
    }


def _demo() -> ModelConfig:
    # The shapes model, exactly as bundled (cvqd/assets/demo.pt; `cvqd-train demo` trains it): 64x64 images, f=8 ->
    # 8x8 = 64 tokens, a 256-entry codebook, a 4-block 128-wide transformer and a small CLIP, all small enough to
    # train from nothing on a 2-core CPU in under an hour. The encoder sees each 8x8 cell alone ("cell"), so colour
    # is a per-token choice and unseen colour/shape pairs compose; one ResNet block per decoder level keeps VQGAN
    # steps cheap on a CPU. aux_weight 0.05 (the paper uses 5e-4) makes a short diffusion schedule learn shape
    # quickly. noise_alpha is the value `cvqd-train demo` derived from the trained CLIP's image-text gap.
    # Sampling defaults: guidance 2 (validated range 1-2) and truncation 0.85, chosen by the recipe on the shapes
    # benchmark's validation split.
    k, embed = 256, 128
    return ModelConfig(
        preset="demo",
        vqgan=VQGANConfig(resolution=64, ch=16, ch_mult=(1, 1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                          z_channels=64, embed_dim=64, n_embed=k, norm_groups=8, kl_weight=5e-5,
                          disc_layers=2, disc_ch=32, disc_start=800, disc_weight=0.8,
                          decoder_res_blocks=1, encoder_scope="cell"),
        transformer=TransformerConfig(num_classes=k, grid=(8, 8), width=128, depth=4, heads=4, mlp="linear",
                                      mlp_hidden=512, mlp_kernel=3, cond_dim=embed, num_steps=100),
        diffusion=DiffusionConfig(num_steps=100, aux_weight=0.05),
        clip=ClipConfig(model_name="shapes-clip", model_cfg=_demo_clip_cfg(embed), embed_dim=embed,
                        context_length=32, tokenizer="ViT-B-32", image_size=64, noise_alpha=0.264),
        sampling=SamplingConfig(steps=25, guidance=2.0, truncation=0.85, guidance_range=(1.0, 2.0)),
    )


def _demo_clip_cfg(embed: int) -> dict[str, Any]:
    # Full BPE vocabulary (any prompt tokenises); shapes captions are short, so a 32-token context suffices.
    return {
        "embed_dim": embed,
        # Fixed 2-D sin-cos position embeddings: a ViT trained from scratch learns "left/right/top/bottom" much
        # sooner with them than with learned ones, and the generator needs position in the image embeddings.
        # Width 64 and 8x8 patches keep the tower cheap on a CPU core; 16x16 patches would be cheaper but carry
        # too little position (docs/experiments.md).
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8,
                       "pos_embed_type": "sin_cos_2d"},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    }


def _tiny() -> ModelConfig:
    k, embed = 32, 32
    return ModelConfig(
        preset="tiny",
        vqgan=VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                          z_channels=16, embed_dim=16, n_embed=k, norm_groups=8, disc_layers=2, disc_ch=8,
                          disc_start=0),
        transformer=TransformerConfig(num_classes=k, grid=(4, 4), width=32, depth=2, heads=2, mlp="conv",
                                      mlp_hidden=64, mlp_kernel=3, cond_dim=embed, num_steps=16),
        diffusion=DiffusionConfig(num_steps=16),
        clip=ClipConfig(model_name="tiny-clip", model_cfg=_tiny_clip_cfg(embed, 32, 16, 8), embed_dim=embed,
                        tokenizer="ViT-B-32", image_size=16),
        sampling=SamplingConfig(steps=16, guidance=2.0, truncation=0.9),
    )


def _ar_of(cfg: ModelConfig, name: str, **sizes: Any) -> ModelConfig:
    """An autoregressive (CLIP-GEN) model on `cfg`'s VQGAN and CLIP."""
    t = cfg.transformer
    return cfg.replace(preset=name, ar=ARConfig(num_classes=t.num_classes, grid=tuple(t.grid), cond_dim=t.cond_dim,
                                                 **sizes))


def _demo_ar() -> ModelConfig:
    # The bundled AR demo: the demo's VQGAN and CLIP, a 4-block 128-wide decoder with 4 condition positions.
    # Sampling defaults as shipped: chosen by its recipe on the validation split (training/demo_ar.py, ArRecipe):
    # guidance 1.5 (validated range 1-2), top-p 0.8.
    cfg = _ar_of(_demo(), "demo-ar", width=128, depth=4, heads=4, mlp_hidden=512, prefix=4)
    return cfg.replace(sampling=cfg.sampling.replace(guidance=1.5, guidance_range=(1.0, 2.0), temperature=1.0,
                                                     top_k=0, top_p=0.8))


def _tiny_ar() -> ModelConfig:
    return _ar_of(_tiny(), "tiny-ar", width=32, depth=2, heads=2, mlp_hidden=64, prefix=2)


PRESETS = {"paper": _paper, "demo": _demo, "tiny": _tiny, "demo-ar": _demo_ar, "tiny-ar": _tiny_ar}


def preset(name: str) -> ModelConfig:
    """A fresh `ModelConfig` for a preset name (paper, demo, tiny)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None

