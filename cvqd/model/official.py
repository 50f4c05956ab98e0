"""The authors' released CLIP-VQDiffusion files -> a cvqd model: configs, key maps and the exact folds.

The official implementation (a fork of VQ-Diffusion that vendors taming-transformers and OpenAI's CLIP) ships:
  - the diffusion network: a bare `DiffusionTransformer` state dict (clipvq_ffhq.pt, clipvq_coco.pt), or a
    training-solver checkpoint (last.pth: {"model", "ema", ...}; the EMA weights are preferred);
  - a Gumbel VQGAN: a PyTorch Lightning checkpoint whose "state_dict" holds encoder/decoder/quantizer (+ loss.*);
  - OpenAI's CLIP ViT-B/32 (QuickGELU activations), as a state dict or TorchScript archive.
Its YAML configs give the sizes and the sampling defaults. Nothing is inferred from file names.

Where the module structures differ the weights are rearranged exactly:
  transformer  query/key/value Linears -> one qkv Linear (rows [q; k; v]); the rest is a rename
  VQGAN        q/k/v 1x1 convs -> one qkv conv; the decoder's `up.{i}` (stored by resolution level, run from the
               last) -> cvqd's `levels.{L-1-i}` (stored in run order); `quant_conv` (z -> e) is folded into the
               quantizer's projection (e -> K): W = Wp Wq, b = Wp bq + bp, computed in float64
  null         `empty_text_embed` [1, D] -> the model's null embedding [D]; official inference uses it raw (training
               normalised it), so by default the converted model does too (`sampling.normalize_null = False`)
Every tensor is accounted for: a key that is unknown, missing or of the wrong shape stops the conversion with its
name. The schedule buffers the official file carries are checked against cvqd's own tables, not loaded.
The key map and computation facts are in docs/official.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from cvqd.errors import CheckpointError, ConfigError, CvqdError
from cvqd.model.config import (ClipConfig, DiffusionConfig, ModelConfig, SamplingConfig, TransformerConfig,
                               VQGANConfig)

# schedule buffers and training statistics of the official DiffusionTransformer: checked or dropped, never loaded
SCHEDULE_BUFFERS = ("log_at", "log_bt", "log_ct", "log_1_min_ct", "log_cumprod_at", "log_cumprod_bt",
                    "log_cumprod_ct", "log_1_min_cumprod_ct")
TRAINING_BUFFERS = ("Lt_history", "Lt_count")


class ConversionError(CvqdError):
    """The given official files do not fit together or are not what they claim to be."""


# ------------------------------------------------------------------------------------------------ configs

class _Loader:
    """A YAML loader that is safe (no arbitrary objects) but reads the `!!python/tuple` tags the official
    configs use for sizes such as `content_spatial_size`."""

    @staticmethod
    def load(text: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("tag:yaml.org,2002:python/tuple",
                               lambda loader, node: tuple(loader.construct_sequence(node)))
        return yaml.load(text, Loader=Loader)


def read_yaml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")
    try:
        data = _Loader.load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is not a YAML text file ({what})") from None
    except Exception as exc:  # yaml.YAMLError and its subclasses
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConversionError(f"{path} is not valid YAML{where} ({what})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a {what} (expected a YAML mapping)")
    return data


def _get(d: dict, dotted: str, path: Path | str, what: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise ConversionError(f"{path} has no {dotted!r}: not a {what}")
        cur = cur[part]
    return cur


def diffusion_settings(cfg: dict, path: Path | str) -> dict[str, Any]:
    """The sizes and sampling defaults of an official diffusion YAML (configs/*_finetune.yaml)."""
    try:
        return _diffusion_settings(cfg, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"{path}: a value the model needs is missing or malformed ({type(exc).__name__}: "
                              f"{str(exc)[:80]}); expected an official CLIP-VQDiffusion config") from None


def _diffusion_settings(cfg: dict, path: Path | str) -> dict[str, Any]:
    what = "CLIP-VQDiffusion config (like configs/ffhq_finetune.yaml)"
    params = _get(cfg, "model.params", path, what)
    dparams = _get(params, "diffusion_config.params", path, what)
    tparams = _get(dparams, "transformer_config.params", path, what)
    eparams = _get(tparams, "content_emb_config.params", path, what) if "content_emb_config" in tparams else \
        _get(dparams, "content_emb_config.params", path, what)
    grid = tuple(int(v) for v in _get(tparams, "content_spatial_size", path, what))
    mlp_type = tparams.get("mlp_type", "conv_mlp")
    if mlp_type != "conv_mlp":
        raise ConversionError(f"{path}: mlp_type {mlp_type!r} is not supported (the released models use conv_mlp)")
    if tparams.get("block_activate", "GELU2") != "GELU2":
        raise ConversionError(f"{path}: block_activate {tparams.get('block_activate')!r} is not supported (GELU2)")
    return {
        "num_classes": int(_get(eparams, "num_embed", path, what)),
        "grid": grid,
        "width": int(_get(tparams, "n_embd", path, what)),
        "depth": int(_get(tparams, "n_layer", path, what)),
        "heads": int(_get(tparams, "n_head", path, what)),
        "mlp_hidden_times": int(tparams.get("mlp_hidden_times", 4)),
        "num_steps": int(dparams.get("diffusion_step", 100)),
        "guidance": float(params.get("guidance_scale", 1.0)),
        "truncation": float(params.get("truncation_r", 1.0)),
        "best_of": int(params.get("times", 1)),
        "learnable_cf": bool(dparams.get("learnable_cf", params.get("learnable_cf", False))),
        "noise_alpha": float(params.get("lafite_alpha", 0.0)),
    }


def vqgan_settings(cfg: dict, path: Path | str) -> dict[str, Any]:
    """The sizes of a taming-transformers GumbelVQ YAML (taming_f16_4096_*.yaml)."""
    try:
        return _vqgan_settings(cfg, path)
    except KeyError as exc:
        raise ConversionError(f"{path} has no {exc} in its model.params or ddconfig: not a taming GumbelVQ "
                              f"config") from None
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{path}: a malformed value ({str(exc)[:80]}): not a taming GumbelVQ config") from None


def _vqgan_settings(cfg: dict, path: Path | str) -> dict[str, Any]:
    what = "taming GumbelVQ config (like taming_f16_4096_ffhq.yaml)"
    params = _get(cfg, "model.params", path, what)
    dd = _get(params, "ddconfig", path, what)
    target = str(cfg.get("model", {}).get("target", ""))
    if target and not target.endswith("GumbelVQ"):
        raise ConversionError(f"{path}: model.target {target!r} is not a GumbelVQ")
    if dd.get("double_z", False):
        raise ConversionError(f"{path}: ddconfig.double_z true is not a GumbelVQ encoder")
    return {
        "resolution": int(dd["resolution"]), "in_channels": int(dd["in_channels"]), "ch": int(dd["ch"]),
        "ch_mult": tuple(int(v) for v in dd["ch_mult"]), "num_res_blocks": int(dd["num_res_blocks"]),
        "attn_resolutions": tuple(int(v) for v in dd["attn_resolutions"]), "z_channels": int(dd["z_channels"]),
        "embed_dim": int(params["embed_dim"]), "n_embed": int(params["n_embed"]),
        "kl_weight": float(params.get("kl_weight", 5e-5)), "out_ch": int(dd.get("out_ch", dd["in_channels"])),
    }


def clip_config_from_state(sd: dict[str, torch.Tensor]) -> ClipConfig:
    """An open_clip config (QuickGELU) for an OpenAI-layout CLIP state dict, read off its shapes (as OpenAI's
    build_model does): the released ViT-B/32 becomes open_clip's built-in "ViT-B-32-quickgelu"."""
    need = ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
            "token_embedding.weight", "ln_final.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ConversionError(f"the CLIP file is not an OpenAI ViT CLIP state dict (no {missing[0]!r})")
    vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
    vision_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    embed_dim = sd["text_projection"].shape[1]
    context_length = sd["positional_embedding"].shape[0]
    vocab = sd["token_embedding.weight"].shape[0]
    width = sd["ln_final.weight"].shape[0]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    image_size = patch * grid
    if (vision_width, vision_layers, patch, image_size, embed_dim, width, layers, context_length, vocab) == \
            (768, 12, 32, 224, 512, 512, 12, 77, 49408):
        return ClipConfig(model_name="ViT-B-32-quickgelu", embed_dim=512, context_length=77, tokenizer="ViT-B-32",
                          image_size=224)
    model_cfg = {"embed_dim": int(embed_dim), "quick_gelu": True,
                 "vision_cfg": {"image_size": int(image_size), "layers": int(vision_layers),
                                "width": int(vision_width), "patch_size": int(patch),
                                "head_width": 64},
                 "text_cfg": {"context_length": int(context_length), "vocab_size": int(vocab), "width": int(width),
                              "heads": max(1, int(width) // 64), "layers": int(layers)}}
    return ClipConfig(model_name="openai-clip-quickgelu", model_cfg=model_cfg, embed_dim=int(embed_dim),
                      context_length=int(context_length), tokenizer="ViT-B-32", image_size=int(image_size))


def build_config(diffusion: dict[str, Any], vqgan: dict[str, Any], clip: ClipConfig, *,
                 normalize_null: bool = False, preset: str = "official") -> ModelConfig:
    """A cvqd ModelConfig equal to the official one; ConversionError when the two YAMLs or CLIP disagree."""
    if diffusion["num_classes"] != vqgan["n_embed"]:
        raise ConversionError(f"the diffusion config has {diffusion['num_classes']} token classes but the VQGAN "
                              f"config a codebook of {vqgan['n_embed']}: not a matching pair")
    down = 2 ** (len(vqgan["ch_mult"]) - 1)
    vq_grid = (vqgan["resolution"] // down, vqgan["resolution"] // down)
    if tuple(diffusion["grid"]) != vq_grid:
        raise ConversionError(f"the diffusion config's token grid {diffusion['grid']} does not match the VQGAN's "
                              f"{vq_grid} ({vqgan['resolution']} px / {down})")
    if vqgan["z_channels"] != vqgan["embed_dim"]:
        raise ConversionError(f"VQGAN z_channels {vqgan['z_channels']} != embed_dim {vqgan['embed_dim']}: the "
                              f"official encoder feeds quant_conv's output to the quantizer, which needs them equal")
    if vqgan["out_ch"] != vqgan["in_channels"]:
        raise ConversionError("VQGAN out_ch != in_channels is not supported")
    if clip.embed_dim != diffusion["width"]:
        raise ConversionError(f"CLIP embeds into {clip.embed_dim} dims but the transformer's condition layers take "
                              f"{diffusion['width']} (the official AdaLN projects the condition with a "
                              f"[width, width] Linear): not this model's CLIP")
    try:
        return ModelConfig(
            preset=preset,
            vqgan=VQGANConfig(**{k: v for k, v in vqgan.items() if k != "out_ch"}, norm_groups=32,
                              encoder_scope="image"),
            transformer=TransformerConfig(num_classes=diffusion["num_classes"], grid=tuple(diffusion["grid"]),
                                          width=diffusion["width"], depth=diffusion["depth"],
                                          heads=diffusion["heads"], mlp="conv",
                                          mlp_hidden=diffusion["mlp_hidden_times"] * diffusion["width"],
                                          mlp_kernel=3, cond_dim=clip.embed_dim, num_steps=diffusion["num_steps"]),
            diffusion=DiffusionConfig(num_steps=diffusion["num_steps"]),
            clip=ClipConfig(**{**clip.to_dict(), "noise_alpha": min(diffusion["noise_alpha"], 0.999)}),
            sampling=SamplingConfig(steps=diffusion["num_steps"], guidance=diffusion["guidance"],
                                    truncation=diffusion["truncation"], best_of=diffusion["best_of"],
                                    normalize_null=normalize_null),
        )
    except ConfigError as exc:
        raise ConversionError(f"the official configs describe a model cvqd cannot build: {exc}") from None


# ----------------------------------------------------------------------------------------------- key maps

class _Taker:
    """Pops tensors from an official state dict by name, checking shapes; `rest()` is what nothing used."""

    def __init__(self, sd: dict[str, torch.Tensor], source: str):
        self.sd, self.source = dict(sd), source

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.sd:
            raise ConversionError(f"{self.source}: missing tensor {key!r}")
        t = self.sd.pop(key)
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"{self.source}: {key!r} is not a tensor")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{self.source}: {key!r} has shape {list(t.shape)}, the config implies "
                                  f"{list(shape)}: the config does not match the weights")
        return t.float()

    def rest(self) -> list[str]:
        return sorted(self.sd)


def transformer_state(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Official DiffusionTransformer state dict -> (cvqd DiffusionTransformer state dict, null embedding [D])."""
    t = cfg.transformer
    D, K, T, (H, W) = t.width, t.num_classes, t.num_steps, t.grid
    hid = t.mlp_hidden
    src = _Taker(sd, source)
    out: dict[str, torch.Tensor] = {}
    pre = "transformer."
    out["tok_emb.weight"] = src.take(pre + "content_emb.emb.weight", (K + 1, D))
    out["row_emb.weight"] = src.take(pre + "content_emb.height_emb.weight", (H, D))
    out["col_emb.weight"] = src.take(pre + "content_emb.width_emb.weight", (W, D))
    for i in range(t.depth):
        b, o = f"{pre}blocks.{i}.", f"blocks.{i}."
        out[o + "ln_t.embed.weight"] = src.take(b + "ln1.emb.weight", (T, D))
        out[o + "ln_t.proj.weight"] = src.take(b + "ln1.linear.weight", (2 * D, D))
        out[o + "ln_t.proj.bias"] = src.take(b + "ln1.linear.bias", (2 * D,))
        out[o + "ln_c.embed.weight"] = src.take(b + "ln2.emb.weight", (D, t.cond_dim))
        out[o + "ln_c.embed.bias"] = src.take(b + "ln2.emb.bias", (D,))
        out[o + "ln_c.proj.weight"] = src.take(b + "ln2.linear.weight", (2 * D, D))
        out[o + "ln_c.proj.bias"] = src.take(b + "ln2.linear.bias", (2 * D,))
        out[o + "attn.qkv.weight"] = torch.cat([src.take(b + f"attn.{n}.weight", (D, D))
                                                for n in ("query", "key", "value")])
        out[o + "attn.qkv.bias"] = torch.cat([src.take(b + f"attn.{n}.bias", (D,)) for n in ("query", "key", "value")])
        out[o + "attn.out.weight"] = src.take(b + "attn.proj.weight", (D, D))
        out[o + "attn.out.bias"] = src.take(b + "attn.proj.bias", (D,))
        out[o + "mlp.fc1.weight"] = src.take(b + "mlp.conv1.weight", (hid, D, 3, 3))
        out[o + "mlp.fc1.bias"] = src.take(b + "mlp.conv1.bias", (hid,))
        out[o + "mlp.fc2.weight"] = src.take(b + "mlp.conv2.weight", (D, hid, 3, 3))
        out[o + "mlp.fc2.bias"] = src.take(b + "mlp.conv2.bias", (D,))
    out["head_norm.weight"] = src.take(pre + "to_logits.0.weight", (D,))
    out["head_norm.bias"] = src.take(pre + "to_logits.0.bias", (D,))
    out["head.weight"] = src.take(pre + "to_logits.1.weight", (K, D))
    out["head.bias"] = src.take(pre + "to_logits.1.bias", (K,))
    if "empty_text_embed" not in src.sd:
        raise ConversionError(f"{source}: no 'empty_text_embed' (the learned null condition): this is a base model "
                              f"without classifier-free guidance, or not a fine-tuned CLIP-VQDiffusion file")
    null = src.take("empty_text_embed", (1, t.cond_dim))[0]
    check_schedule(src, cfg, source)
    for key in TRAINING_BUFFERS:
        src.sd.pop(key, None)
    extra = src.rest()
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ConversionError(f"{source}: unexpected tensors {extra[:3]}{more}: the config describes another "
                              f"architecture (e.g. more layers) or the file is not a diffusion transformer")
    return out, null


def check_schedule(src: _Taker, cfg: ModelConfig, source: str) -> None:
    """The official file's schedule buffers against cvqd's own tables (same formula; must agree to fp32)."""
    from cvqd.model.schedule import MaskReplaceSchedule

    T, K = cfg.diffusion.num_steps, cfg.transformer.num_classes
    sched = MaskReplaceSchedule.from_config(cfg.diffusion, K).tables
    ours = {"log_cumprod_at": sched["log_abar"], "log_cumprod_bt": sched["log_bbar"],
            "log_cumprod_ct": sched["log_gbar"]}
    for key in SCHEDULE_BUFFERS:
        if key not in src.sd:
            continue  # older exports may lack some; the schedule is recomputed anyway
        v = src.sd.pop(key).double()
        if key in ours:
            ref = torch.from_numpy(ours[key]).double()
            if v.shape != ref.shape:
                raise ConversionError(f"{source}: its schedule buffer {key} has {list(v.shape)} entries, the config's "
                                      f"diffusion_step implies {list(ref.shape)}: the config does not fit the file")
            finite = torch.isfinite(ref) & torch.isfinite(v)
            if (finite != torch.isfinite(ref)).any() or (v[finite] - ref[finite]).abs().max() > 1e-4:
                raise ConversionError(f"{source}: its diffusion schedule ({key}) differs from the standard one for "
                                      f"T={T}, K={K}: the config's diffusion_step or num_embed does not fit")


def _attn(src: _Taker, pre: str, c: int) -> dict[str, torch.Tensor]:
    return {"norm.weight": src.take(pre + "norm.weight", (c,)), "norm.bias": src.take(pre + "norm.bias", (c,)),
            "qkv.weight": torch.cat([src.take(pre + f"{n}.weight", (c, c, 1, 1)) for n in "qkv"]),
            "qkv.bias": torch.cat([src.take(pre + f"{n}.bias", (c,)) for n in "qkv"]),
            "proj.weight": src.take(pre + "proj_out.weight", (c, c, 1, 1)),
            "proj.bias": src.take(pre + "proj_out.bias", (c,))}


def _resnet(src: _Taker, pre: str, c_in: int, c_out: int) -> dict[str, torch.Tensor]:
    out = {"norm1.weight": src.take(pre + "norm1.weight", (c_in,)), "norm1.bias": src.take(pre + "norm1.bias", (c_in,)),
           "conv1.weight": src.take(pre + "conv1.weight", (c_out, c_in, 3, 3)),
           "conv1.bias": src.take(pre + "conv1.bias", (c_out,)),
           "norm2.weight": src.take(pre + "norm2.weight", (c_out,)),
           "norm2.bias": src.take(pre + "norm2.bias", (c_out,)),
           "conv2.weight": src.take(pre + "conv2.weight", (c_out, c_out, 3, 3)),
           "conv2.bias": src.take(pre + "conv2.bias", (c_out,))}
    if c_in != c_out:
        out["skip.weight"] = src.take(pre + "nin_shortcut.weight", (c_out, c_in, 1, 1))
        out["skip.bias"] = src.take(pre + "nin_shortcut.bias", (c_out,))
    return out


def _put(out: dict, prefix: str, part: dict) -> None:
    out.update({prefix + k: v for k, v in part.items()})


def vqgan_state(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Official taming GumbelVQ state dict (loss.* already dropped) -> cvqd VQGAN state dict."""
    v = cfg.vqgan
    src = _Taker(sd, source)
    out: dict[str, torch.Tensor] = {}
    L = len(v.ch_mult)
    chans = [v.ch * m for m in v.ch_mult]
    # encoder: down.{i} in run order, like cvqd's levels.{i}
    out["encoder.conv_in.weight"] = src.take("encoder.conv_in.weight", (v.ch, v.in_channels, 3, 3))
    out["encoder.conv_in.bias"] = src.take("encoder.conv_in.bias", (v.ch,))
    res, c_in = v.resolution, v.ch
    for i in range(L):
        c_out = chans[i]
        for j in range(v.num_res_blocks):
            _put(out, f"encoder.levels.{i}.blocks.{j}.", _resnet(src, f"encoder.down.{i}.block.{j}.", c_in, c_out))
            c_in = c_out
            if res in v.attn_resolutions:
                _put(out, f"encoder.levels.{i}.attns.{j}.", _attn(src, f"encoder.down.{i}.attn.{j}.", c_in))
        if i < L - 1:
            out[f"encoder.levels.{i}.down.conv.weight"] = src.take(f"encoder.down.{i}.downsample.conv.weight",
                                                                   (c_in, c_in, 3, 3))
            out[f"encoder.levels.{i}.down.conv.bias"] = src.take(f"encoder.down.{i}.downsample.conv.bias", (c_in,))
            res //= 2
    _put(out, "encoder.mid.0.", _resnet(src, "encoder.mid.block_1.", c_in, c_in))
    _put(out, "encoder.mid.1.", _attn(src, "encoder.mid.attn_1.", c_in))
    _put(out, "encoder.mid.2.", _resnet(src, "encoder.mid.block_2.", c_in, c_in))
    out["encoder.norm_out.weight"] = src.take("encoder.norm_out.weight", (c_in,))
    out["encoder.norm_out.bias"] = src.take("encoder.norm_out.bias", (c_in,))
    out["encoder.conv_out.weight"] = src.take("encoder.conv_out.weight", (v.z_channels, c_in, 3, 3))
    out["encoder.conv_out.bias"] = src.take("encoder.conv_out.bias", (v.z_channels,))
    # quantizer: fold quant_conv (z -> e, 1x1) into the projection (e -> K, 1x1), in float64
    wq = src.take("quant_conv.weight", (v.embed_dim, v.z_channels, 1, 1)).double()[:, :, 0, 0]
    bq = src.take("quant_conv.bias", (v.embed_dim,)).double()
    wp = src.take("quantize.proj.weight", (v.n_embed, v.embed_dim, 1, 1)).double()[:, :, 0, 0]
    bp = src.take("quantize.proj.bias", (v.n_embed,)).double()
    out["quantize.proj.weight"] = (wp @ wq).float()[:, :, None, None]
    out["quantize.proj.bias"] = (wp @ bq + bp).float()
    out["quantize.embed.weight"] = src.take("quantize.embed.weight", (v.n_embed, v.embed_dim))
    out["post_quant_conv.weight"] = src.take("post_quant_conv.weight", (v.z_channels, v.embed_dim, 1, 1))
    out["post_quant_conv.bias"] = src.take("post_quant_conv.bias", (v.z_channels,))
    # decoder: official up.{i} is resolution level i (run from i = L-1 down to 0); cvqd levels.{k} run in order
    c_in = chans[-1]
    out["decoder.conv_in.weight"] = src.take("decoder.conv_in.weight", (c_in, v.z_channels, 3, 3))
    out["decoder.conv_in.bias"] = src.take("decoder.conv_in.bias", (c_in,))
    _put(out, "decoder.mid.0.", _resnet(src, "decoder.mid.block_1.", c_in, c_in))
    _put(out, "decoder.mid.1.", _attn(src, "decoder.mid.attn_1.", c_in))
    _put(out, "decoder.mid.2.", _resnet(src, "decoder.mid.block_2.", c_in, c_in))
    n_dec = v.decoder_res_blocks if v.decoder_res_blocks is not None else v.num_res_blocks + 1
    res = v.resolution // 2 ** (L - 1)
    for k, i in enumerate(reversed(range(L))):
        c_out = chans[i]
        for j in range(n_dec):
            _put(out, f"decoder.levels.{k}.blocks.{j}.", _resnet(src, f"decoder.up.{i}.block.{j}.", c_in, c_out))
            c_in = c_out
            if res in v.attn_resolutions:
                _put(out, f"decoder.levels.{k}.attns.{j}.", _attn(src, f"decoder.up.{i}.attn.{j}.", c_in))
        if i > 0:
            out[f"decoder.levels.{k}.up.conv.weight"] = src.take(f"decoder.up.{i}.upsample.conv.weight",
                                                                 (c_in, c_in, 3, 3))
            out[f"decoder.levels.{k}.up.conv.bias"] = src.take(f"decoder.up.{i}.upsample.conv.bias", (c_in,))
            res *= 2
    out["decoder.norm_out.weight"] = src.take("decoder.norm_out.weight", (c_in,))
    out["decoder.norm_out.bias"] = src.take("decoder.norm_out.bias", (c_in,))
    out["decoder.conv_out.weight"] = src.take("decoder.conv_out.weight", (v.in_channels, c_in, 3, 3))
    out["decoder.conv_out.bias"] = src.take("decoder.conv_out.bias", (v.in_channels,))
    extra = src.rest()
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ConversionError(f"{source}: unexpected tensors {extra[:3]}{more}: the taming config describes another "
                              f"architecture, or the file is not a Gumbel VQGAN")
    return out


# ------------------------------------------------------------------------------------------------- files

def _torch_load(path: Path, what: str, safe_globals: list | None = None) -> Any:
    """torch.load with weights_only=True (nothing but tensors and containers is unpickled; `safe_globals` maps
    the few class names a format stores to inert stand-ins); one-line errors that describe the file."""
    from cvqd.model.checkpoint import unreadable_reason

    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")
    import pickle

    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        name = found.group(1) if found else "a Python object"
        raise ConversionError(f"{path} is not a {what}: it stores {name}, which cvqd does not unpickle") from None
    except Exception:
        raise ConversionError(unreadable_reason(path).replace("a cvqd checkpoint", f"a {what}")) from None


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_diffusion_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The released DiffusionTransformer state dict, or the EMA (else the model) weights of a training-solver
    checkpoint; -> (state dict in the released layout, which part was used)."""
    path = Path(path)
    what = "CLIP-VQDiffusion diffusion file (a DiffusionTransformer state dict or a training last.pth)"
    obj = _torch_load(path, what, lightning_stand_ins())  # so a VQGAN given here is recognised as one
    if _tensor_dict(obj) and any(k.startswith("transformer.content_emb.") for k in obj):
        return obj, "state dict"
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        for part in ("ema", "model"):
            sd = obj.get(part)
            if _tensor_dict(sd) and any(k.startswith("transformer.content_emb.") for k in sd):
                return sd, part
            if _tensor_dict(sd) and any(k.startswith("transformer.transformer.content_emb.") for k in sd):
                # the whole CLIPVQDiffusion: keep the DiffusionTransformer's part (codecs are given separately)
                return {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}, part
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict) and \
            any(k.startswith(("encoder.", "decoder.")) for k in obj["state_dict"]):
        raise ConversionError(f"{path} is a VQGAN (Lightning) checkpoint, not a diffusion file: give it as the VQGAN")
    if _tensor_dict(obj) and any(k.startswith("visual.") for k in obj):
        raise ConversionError(f"{path} is a CLIP state dict, not a diffusion file: give it as the CLIP weights")
    raise ConversionError(f"{path} is not a {what}: no 'transformer.content_emb.*' tensors")


def lightning_stand_ins() -> list:
    """Inert stand-ins for the class names a PyTorch Lightning 1.x checkpoint stores (its `callbacks` dict is
    keyed by the callback class): allow-listed under those names, nothing of Lightning is imported or run."""

    class ModelCheckpoint:  # noqa: D401  (a name holder)
        """Stand-in for pytorch_lightning's ModelCheckpoint class, used only as a dict key."""

    return [(ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def load_vqgan_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The generator weights of a taming-transformers GumbelVQ Lightning checkpoint (loss.* dropped by name)."""
    path = Path(path)
    what = "taming GumbelVQ checkpoint (a PyTorch Lightning .ckpt with a state_dict)"
    obj = _torch_load(path, what, lightning_stand_ins())
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if sd is None and _tensor_dict(obj):
        sd = obj  # a bare state dict
    if not isinstance(sd, dict) or not any(k.startswith("decoder.") for k in sd):
        if _tensor_dict(obj) and any(k.startswith("transformer.") for k in obj):
            raise ConversionError(f"{path} is a diffusion transformer, not a VQGAN: give it as the diffusion file")
        raise ConversionError(f"{path} is not a {what}: no 'decoder.*' tensors")
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def load_clip_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An OpenAI-layout CLIP state dict (a state dict file or OpenAI's TorchScript archive)."""
    from cvqd.model.clip import clip_state_from_file

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"CLIP file not found: {path}")
    try:
        sd = clip_state_from_file(path)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    drop = {"input_resolution", "context_length", "vocab_size"}
    return {k: v.float() for k, v in sd.items() if k not in drop}


# ------------------------------------------------------------------------------------------------ convert

def convert(config: str | os.PathLike, diffusion: str | os.PathLike, vqgan: str | os.PathLike,
            vqgan_config: str | os.PathLike, clip: str | os.PathLike, *, normalize_null: bool = False,
            embed_clip: bool = True):
    """Build the cvqd model of an official release: -> (CLIPVQDiffusion in eval mode, report dict)."""
    from cvqd.model.clip import load_clip_weights
    from cvqd.model.clipvqd import CLIPVQDiffusion

    dset = diffusion_settings(read_yaml(config, "CLIP-VQDiffusion config"), config)
    vset = vqgan_settings(read_yaml(vqgan_config, "taming VQGAN config"), vqgan_config)
    clip_sd = load_clip_file(clip)
    cfg = build_config(dset, vset, clip_config_from_state(clip_sd), normalize_null=normalize_null)
    dsd, part = load_diffusion_file(diffusion)
    tstate, null = transformer_state(dsd, cfg, str(diffusion))
    vstate = vqgan_state(load_vqgan_file(vqgan), cfg, str(vqgan))
    model = CLIPVQDiffusion(cfg, build_clip_model=True)
    model.load_model_state({"vqgan": vstate, "transformer": tstate, "null_embedding": null, "clip": None},
                           str(diffusion))
    load_clip_weights(model.clip.model, clip_sd, str(clip))
    model.eval()
    report = {"diffusion_part": part, "transformer_params": sum(v.numel() for v in tstate.values()),
              "vqgan_params": sum(v.numel() for v in vstate.values()),
              "clip_params": sum(v.numel() for v in clip_sd.values()),
              "null_norm": float(null.norm()), "normalize_null": normalize_null,
              "sampling": cfg.sampling.to_dict(), "clip_model": cfg.clip.model_name, "embed_clip": embed_clip}
    return model, report

