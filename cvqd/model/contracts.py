"""I/O contracts of the exported components, declared once.

The ONNX exporter, the TensorRT builder (optimization profiles) and the runtime (buffer allocation,
input checks) all read these. Every graph has a dynamic batch dimension "batch"; the other dims are fixed
by the model config. Graph boundaries are always int64 / float32, whatever the plan's precision: fp16
plans cast inside the graph, so the runtime never converts dtypes and fp32/fp16 plans are interchangeable.

Components (B = batch; the transformer runs 2 rows per image with guidance):
  clip_text    input_ids [B, ctx] int64                                   -> text_embeds [B, D] float32 (L2-normalised)
  clip_image   pixel_values [B, 3, S, S] float32 (CLIP-normalised)       -> image_embeds [B, D] float32 (L2-normalised)
  transformer  tokens [B, N] int64, timestep [B] int64, cond [B, D] float32 -> logits [B, K, N] float32
               (unnormalised x_0 logits over the K real classes: log_softmax and the clamp to [-70, 0] are
               part of the sampling step, so the fused kernel reads the logits once)
  vq_decoder   tokens [B, N] int64                                        -> images [B, 3, H, W] float32 in [-1, 1]
  vq_encoder   images [B, 3, H, W] float32 in [-1, 1]                     -> tokens [B, N] int64 (most likely code
               per cell; token-space editing; optional: plans made before it existed lack it)

Autoregressive (CLIP-GEN) plans have two generator graphs instead of `transformer` (cvqd/model/ar.py), over a
fixed-size KV cache [B, 2L, h, S, d] (S = prefix + N - 1; dim 1 = keys and values of each block):
  ar_prefill   cond [B, D] float32                                        -> logits [B, K] float32 (token 0),
                                                                             present [B, 2L, h, S, d] float32
  ar_decode    token [B] int64, position [1] int64, past [B, 2L, h, S, d] -> logits [B, K] float32 (token n+1),
                                                                             present [B, 2L, h, S, d] float32
               (token n at position n writes cache slot prefix + n and attends to slots <= prefix + n)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from cvqd.model.config import ModelConfig

# The one denoiser contract of every sampler, backend and exported graph (numpy arrays on the CPU runtime, torch
# tensors elsewhere): tokens [R, N] int64 (mask id K), timesteps [R] int64, conditions [R, D] float32
#   -> x_0 logits [R, K, N] float32, unnormalised (DiffusionTransformer.logits; the plan's transformer graph).
Denoise = Callable[[Any, Any, Any], Any]

COMPONENTS = ("clip_text", "clip_image", "transformer", "vq_decoder")  # every diffusion plan has these
OPTIONAL_COMPONENTS = ("vq_encoder",)  # exported since token editing; older plans lack it
AR_COMPONENTS = ("clip_text", "clip_image", "ar_prefill", "ar_decode", "vq_decoder")  # every autoregressive plan
EXPORTED = COMPONENTS + OPTIONAL_COMPONENTS
AR_EXPORTED = AR_COMPONENTS + OPTIONAL_COMPONENTS
KNOWN = tuple(dict.fromkeys(EXPORTED + AR_EXPORTED))
BATCH = "batch"


def required_components(cfg: ModelConfig) -> tuple[str, ...]:
    """The components every plan of this model has."""
    return AR_COMPONENTS if cfg.generator == "ar" else COMPONENTS


def exported_components(cfg: ModelConfig) -> tuple[str, ...]:
    """The components cvqd-export writes for this model, in order."""
    return AR_EXPORTED if cfg.generator == "ar" else EXPORTED


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32"
    shape: tuple[int | str, ...]  # "batch" marks the dynamic dimension

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)


@dataclass(frozen=True)
class Contract:
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    min_batch: int
    opt_batch: int
    max_batch: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("inputs", "outputs"):
            d[key] = [{**t, "shape": list(t["shape"])} for t in d[key]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Contract":
        specs = lambda xs: tuple(TensorSpec(x["name"], x["dtype"], tuple(x["shape"])) for x in xs)  # noqa: E731
        return cls(d["component"], specs(d["inputs"]), specs(d["outputs"]), int(d["min_batch"]),
                   int(d["opt_batch"]), int(d["max_batch"]))


def contracts(cfg: ModelConfig, max_images: int = 8) -> dict[str, Contract]:
    """The contracts of every exported component for a model config; `max_images` bounds the images sampled
    together."""
    B, D, K, N = BATCH, cfg.clip.embed_dim, cfg.transformer.num_classes, cfg.transformer.seq_len
    ctx, S, R = cfg.clip.context_length, cfg.clip.image_size, cfg.vqgan.resolution
    f32, i64 = "float32", "int64"
    rows = 2 * max_images  # conditional + null rows in one forward
    out = {
        "clip_text": Contract("clip_text", (TensorSpec("input_ids", i64, (B, ctx)),),
                              (TensorSpec("text_embeds", f32, (B, D)),), 1, 1, max_images),
        "clip_image": Contract("clip_image", (TensorSpec("pixel_values", f32, (B, 3, S, S)),),
                               (TensorSpec("image_embeds", f32, (B, D)),), 1, 1, max(16, max_images)),
        "transformer": Contract("transformer",
                                (TensorSpec("tokens", i64, (B, N)), TensorSpec("timestep", i64, (B,)),
                                 TensorSpec("cond", f32, (B, D))),
                                (TensorSpec("logits", f32, (B, K, N)),), 1, 2, rows),
        "vq_decoder": Contract("vq_decoder", (TensorSpec("tokens", i64, (B, N)),),
                               (TensorSpec("images", f32, (B, 3, R, R)),), 1, 1, max_images),
        "vq_encoder": Contract("vq_encoder", (TensorSpec("images", f32, (B, 3, R, R)),),
                               (TensorSpec("tokens", i64, (B, N)),), 1, 1, max_images)
    }
    if cfg.ar is None:
        return out
    a = cfg.ar
    cache = (B, 2 * a.depth, a.heads, a.cache_len, a.head_dim)
    del out["transformer"]
    out["ar_prefill"] = Contract("ar_prefill", (TensorSpec("cond", f32, (B, D)),),
                                 (TensorSpec("logits", f32, (B, K)), TensorSpec("present", f32, cache)), 1, 2, rows)
    out["ar_decode"] = Contract("ar_decode",
                                (TensorSpec("token", i64, (B,)), TensorSpec("position", i64, (1,)),
                                 TensorSpec("past", f32, cache)),
                                (TensorSpec("logits", f32, (B, K)), TensorSpec("present", f32, cache)), 1, 2, rows)
    return out
