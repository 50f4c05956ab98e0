"""Export-ready modules: one `nn.Module` per component, matching its I/O contract (cvqd/model/contracts.py).

The training modules are not exported as they are. `prepare()` makes an export copy that:
- shares the fp32 weights (no copy) or holds fp16 copies of them (`precision="fp16"`: graphs made in torch);
- keeps every normalisation in float32 (`Fp32Norm`): LayerNorm / GroupNorm statistics over hundreds of
  channels overflow or lose precision in fp16, and fp16 VQ decoders are known to give NaN or black images;
- replaces the attention layers (open_clip's `nn.MultiheadAttention`, the transformer's SDPA attention and
  the VQGAN's spatial attention) by plain MatMul -> Softmax -> MatMul with q pre-scaled (fp16 range) and the
  softmax in float32. This is one graph pattern ONNX Runtime and TensorRT both handle, independent of the
  exporter's SDPA lowering, and it sidesteps the MultiheadAttention fast path.

Graph boundaries are int64 / float32 at every precision: inputs are cast to the compute dtype inside the
graph and outputs back to float32, so fp32 and fp16 plans are interchangeable for the runtime.

CLIP text pooling: open_clip gathers the hidden state at each row's end-of-text token (`x[arange(B), argmax]`),
which exports as a data-dependent GatherND. Here it is a one-hot mask built from the argmax and a batched
MatMul ([B, 1, ctx] @ [B, ctx, W]): ArgMax/Equal/MatMul are plain ops for ONNX Runtime and TensorRT alike (ONNX
OneHot is avoided: older TensorRT parsers lack it). The argmax runs on the ids cast to float32 (exact below 2^24):
older TensorRT parsers took ArgMax on FP32/FP16 only.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.errors import CvqdError
from cvqd.model.transformer import DiffusionTransformer, SelfAttention
from cvqd.model.vqgan import VQGAN, AttnBlock

NORMS = (nn.LayerNorm, nn.GroupNorm)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with the softmax in float32: [B, h, L, d] -> [B, h, L, d]."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).float()  # [B, h, L, L]
    if mask is not None:
        scores = scores + mask.float()
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class Fp32Norm(nn.Module):
    """Runs a normalisation layer (kept in float32) on a float32 view of its input, returns the input dtype."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)  # both casts vanish from fp32 graphs


class ExportMHA(nn.Module):
    """Self-attention with nn.MultiheadAttention's weights and call signature (batch_first, packed in-proj)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn):
            raise CvqdError("this CLIP's attention layout is not supported by the exporter "
                            "(expected open_clip's batch_first self-attention)")
        self.heads = mha.num_heads
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        B, L, W = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, L, d] each
        y = attention(q, k, v, attn_mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W)), None


class ExportSelfAttention(nn.Module):
    """The diffusion transformer's SelfAttention with the float32-softmax attention."""

    def __init__(self, old: SelfAttention):
        super().__init__()
        self.heads, self.qkv, self.out = old.heads, old.qkv, old.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(attention(q, k, v).transpose(1, 2).reshape(B, N, W))


class ExportAttnBlock(nn.Module):
    """The VQGAN's single-head spatial attention (residual included) with the float32-softmax attention."""

    def __init__(self, old: AttnBlock):
        super().__init__()
        self.norm, self.qkv, self.proj = old.norm, old.qkv, old.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [B,1,HW,C]
        h = attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


SWAPS = {nn.MultiheadAttention: ExportMHA, SelfAttention: ExportSelfAttention, AttnBlock: ExportAttnBlock}


def prepare(module: nn.Module, precision: str) -> nn.Module:
    """An export copy of `module` (never modifies it): attention swapped, norms in fp32, weights in `precision`.

    fp32 copies share the weight tensors with `module` (no extra memory for a 2 GB transformer); fp16
    copies hold fp16 weights, except the normalisation layers' which stay float32.
    """
    dtype = DTYPES[precision]
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        keep = isinstance(mod, NORMS)
        for t in itertools.chain(mod._parameters.values(), mod._buffers.values()):
            if t is None or id(t) in memo:
                continue
            cast = t if (keep or dtype == torch.float32 or not t.is_floating_point()) else t.detach().to(dtype)
            memo[id(t)] = nn.Parameter(cast, requires_grad=False) if isinstance(t, nn.Parameter) and cast is not t \
                else cast
    clone = copy.deepcopy(module, memo)  # tensors come from memo: shared (fp32) or cast (fp16), never copied
    return _swap(clone.eval())


def _swap(m: nn.Module) -> nn.Module:
    for name, child in list(m.named_children()):
        if type(child) in SWAPS:
            child = SWAPS[type(child)](child)
        elif isinstance(child, NORMS):
            setattr(m, name, Fp32Norm(child))
            continue
        setattr(m, name, _swap(child))
    return m


# ------------------------------------------------------------------------------------------ components

class ClipTextGraph(nn.Module):
    """input_ids [B, ctx] int64 -> text_embeds [B, D] float32, L2-normalised (open_clip's encode_text)."""

    def __init__(self, clip_model: nn.Module, precision: str):
        super().__init__()
        m = prepare(clip_model, precision)
        if getattr(m, "text_pool_type", "argmax") != "argmax" or not hasattr(m, "token_embedding"):
            raise CvqdError("the exporter supports open_clip CLIP text towers with end-of-text (argmax) pooling; "
                            f"this CLIP has pool type {getattr(m, 'text_pool_type', '?')!r}")
        self.token_embedding, self.transformer, self.ln_final = m.token_embedding, m.transformer, m.ln_final
        self.positional_embedding, self.text_projection = m.positional_embedding, m.text_projection
        self.register_buffer("attn_mask", m.attn_mask, persistent=False)  # causal, additive [ctx, ctx]
        self.register_buffer("positions", torch.arange(m.positional_embedding.shape[0], dtype=torch.float32),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.positional_embedding  # [B, ctx, W]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        # end-of-text pooling: the EOT id is the largest id of a row; one-hot of its first position
        eot = input_ids.to(torch.float32).argmax(dim=-1, keepdim=True).to(torch.float32)  # [B, 1]
        onehot = (self.positions[None, :] == eot).to(x.dtype)  # [B, ctx]
        pooled = torch.matmul(onehot.unsqueeze(1), x).squeeze(1)  # [B, W]
        proj = self.text_projection
        y = pooled if proj is None else proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # [B, D]
        return F.normalize(y.float(), dim=-1)


class ClipImageGraph(nn.Module):
    """pixel_values [B, 3, S, S] float32 (CLIP-normalised) -> image_embeds [B, D] float32, L2-normalised."""

    def __init__(self, clip_model: nn.Module, precision: str):
        super().__init__()
        self.visual = prepare(clip_model.visual, precision)
        self.dtype = DTYPES[precision]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixel_values.to(self.dtype)).float(), dim=-1)


class TransformerGraph(nn.Module):
    """tokens [B, N] int64, timestep [B] int64, cond [B, D] float32 -> logits [B, K, N] float32 (unnormalised)."""

    def __init__(self, transformer: DiffusionTransformer, precision: str):
        super().__init__()
        self.transformer = prepare(transformer, precision)
        self.dtype = DTYPES[precision]

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.transformer.logits(tokens, timestep, cond.to(self.dtype)).float()


class DecoderGraph(nn.Module):
    """tokens [B, N] int64 -> images [B, 3, H, W] float32, nominally in [-1, 1] (not clamped: the runtime does)."""

    def __init__(self, vqgan: VQGAN, precision: str):
        super().__init__()
        self.vqgan = prepare(vqgan, precision)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(tokens).float()


class EncoderGraph(nn.Module):
    """images [B, 3, H, W] float32 in [-1, 1] -> tokens [B, N] int64: the most likely code of each cell."""

    def __init__(self, vqgan: VQGAN, precision: str):
        super().__init__()
        self.vqgan = prepare(vqgan, precision)
        self.dtype = DTYPES[precision]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vqgan.encode(images.to(self.dtype))


class ARPrefillGraph(nn.Module):
    """cond [B, D] float32 -> logits [B, K] float32 (token 0), present [B, 2L, h, S, d] float32 (the KV cache)."""

    def __init__(self, ar, precision: str):
        super().__init__()
        self.ar = prepare(ar, precision)
        self.dtype = DTYPES[precision]

    def forward(self, cond: torch.Tensor):
        logits, cache = self.ar.prefill(cond.to(self.dtype), attention=attention)
        return logits.float(), cache.float()


class ARDecodeGraph(nn.Module):
    """token [B] int64, position [1] int64, past [B, 2L, h, S, d] float32 -> logits [B, K], present (same shape).

    One token's work: its keys/values are written into slot prefix + position of the cache (a select against the
    slot index, no data-dependent scatter) and it attends to the slots up to its own."""

    def __init__(self, ar, precision: str):
        super().__init__()
        self.ar = prepare(ar, precision)
        self.dtype = DTYPES[precision]

    def forward(self, token: torch.Tensor, position: torch.Tensor, past: torch.Tensor):
        logits, cache = self.ar.decode(token, position, past.to(self.dtype), attention=attention)
        return logits.float(), cache.float()


def build_graph(component: str, model, precision: str) -> nn.Module:
    """The export module of `component` for a loaded CLIPVQDiffusion `model` (left unmodified)."""
    if precision not in DTYPES:
        raise CvqdError(f"unknown precision {precision!r}; expected one of {sorted(DTYPES)}")
    if component == "clip_text":
        return ClipTextGraph(model.require_clip().model, precision).eval()
    if component == "clip_image":
        return ClipImageGraph(model.require_clip().model, precision).eval()
    if component == "transformer":
        return TransformerGraph(model.transformer, precision).eval()
    if component == "vq_decoder":
        return DecoderGraph(model.vqgan, precision).eval()
    if component == "vq_encoder":
        return EncoderGraph(model.vqgan, precision).eval()
    if component == "ar_prefill":
        return ARPrefillGraph(model.ar, precision).eval()
    if component == "ar_decode":
        return ARDecodeGraph(model.ar, precision).eval()
    raise CvqdError(f"unknown component {component!r}")


@torch.no_grad()
def reference(component: str, model, inputs: dict[str, torch.Tensor]):
    """The PyTorch fp32 ground truth of a component, computed with the unmodified training modules (a tensor, or
    the (logits, present) pair of the autoregressive graphs)."""
    if component == "clip_text":
        return F.normalize(model.require_clip().model.encode_text(inputs["input_ids"]).float(), dim=-1)
    if component == "clip_image":
        return F.normalize(model.require_clip().model.encode_image(inputs["pixel_values"]).float(), dim=-1)
    if component == "transformer":
        return model.transformer.logits(inputs["tokens"], inputs["timestep"], inputs["cond"]).float()
    if component == "vq_decoder":
        return model.vqgan.decode(inputs["tokens"]).float()
    if component == "vq_encoder":
        return model.vqgan.encode(inputs["images"])
    if component == "ar_prefill":
        return model.ar.prefill(inputs["cond"])
    if component == "ar_decode":
        return model.ar.decode(inputs["token"], inputs["position"], inputs["past"])
    raise CvqdError(f"unknown component {component!r}")
