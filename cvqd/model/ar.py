"""The CLIP-GEN generator: a decoder-only transformer over VQ tokens in raster order (docs/algorithm.md).

The CLIP embedding c [B, D] becomes P condition positions (Linear(D -> P * W), plus their own position
embeddings); the N tokens follow, shifted by one, so position P - 1 + n predicts token n:

    sequence  [c_1 .. c_P, x_0 .. x_{N-2}]   (length P + N - 1 = cache_len)
    logits    of x_0 .. x_{N-1}              (from positions P - 1 .. P + N - 2)

Pre-LN GPT blocks: x + Attn(LN(x)) with a causal mask, x + MLP(LN(x)) with GELU2; head LN -> Linear(W -> K).

Three ways to run the same weights:
- `logits(tokens, cond)`: teacher forcing over the whole sequence (training): [B, N] -> [B, N, K].
- `prefill(cond)`: the condition positions -> (logits of x_0 [B, K], KV cache [B, 2L, h, S, d]).
- `decode(token, position, cache)`: one token's work: x_n at `position` n -> (logits of x_{n+1} [B, K], cache).
  The cache has a fixed size S = cache_len (slot P + n holds token n's keys/values); a step writes its slot and
  attends to slots <= P + n. Fixed shapes make one decode step a static graph: the exported ONNX graph, and the
  torch backend's CUDA graph. `decode(..., inplace=True)` writes the slot into `cache` itself (the static cache
  of the torch backend); otherwise a new cache is returned (the ONNX graph's present = f(past)).
Cache layout: dim 1 interleaves layers: 2l = keys of block l, 2l + 1 = its values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.model.config import ARConfig
from cvqd.model.transformer import GELU2

NEG_INF = -1e9  # additive attention mask for future / unwritten slots (finite: fp16-safe, exp() is exactly 0)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, W] -> q, k, v [B, h, L, d]."""
        B, L, W = x.shape
        return self.qkv(x).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, h, L, d] -> [B, L, W] through the output projection."""
        B, h, L, d = y.shape
        return self.out(y.transpose(1, 2).reshape(B, L, h * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class ARBlock(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg.width, cfg.heads)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc1, self.act = nn.Linear(cfg.width, cfg.mlp_hidden), GELU2()
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.ln2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(x)


class ARTransformer(nn.Module):
    """p(x_n | x_<n, c) over a token grid in raster order; see the module docstring."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        W, P = cfg.width, cfg.prefix
        self.cond_proj = nn.Linear(cfg.cond_dim, P * W)
        self.tok_emb = nn.Embedding(cfg.num_classes, W)
        self.pos_emb = nn.Embedding(cfg.cache_len, W)  # condition positions, then tokens 0 .. N-2
        self.blocks = nn.ModuleList(ARBlock(cfg) for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(W)
        self.head = nn.Linear(W, cfg.num_classes)
        self.apply(_init_weights)

    # ------------------------------------------------------------------------------- whole sequence

    def embed_prefix(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, D] -> the condition positions [B, P, W]."""
        P, W = self.cfg.prefix, self.cfg.width
        x = self.cond_proj(cond).view(cond.shape[0], P, W)
        return x + self.pos_emb.weight[:P]

    def logits(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens [B, L] int64 (the first L <= N tokens), cond [B, D] -> logits of those tokens
        [B, L, K] (unnormalised)."""
        P, L = self.cfg.prefix, tokens.shape[1]
        prev = self.tok_emb(tokens[:, :-1]) + self.pos_emb.weight[P:P + L - 1]  # [B, L-1, W]
        x = torch.cat([self.embed_prefix(cond), prev], dim=1)  # [B, P + N - 1, W]
        for block in self.blocks:
            x = block(x)
        return self.head(self.head_norm(x[:, P - 1:]))

    # --------------------------------------------------------------------------------- cached steps

    def empty_cache(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        c = self.cfg
        return torch.zeros(batch, 2 * c.depth, c.heads, c.cache_len, c.head_dim, device=device, dtype=dtype)

    def prefill(self, cond: torch.Tensor, attention=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cond [B, D] -> (logits of token 0 [B, K], cache [B, 2L, h, S, d] with the P condition slots filled)."""
        attention = attention or _sdpa
        c = self.cfg
        x = self.embed_prefix(cond)  # [B, P, W]
        P = c.prefix
        causal = torch.full((P, P), NEG_INF, device=x.device, dtype=torch.float32).triu(1)
        kv = []
        for block in self.blocks:
            q, k, v = block.attn.split(block.ln1(x))
            x = x + block.attn.merge(attention(q, k, v, causal))
            x = x + block.mlp(x)
            kv += [k, v]
        filled = torch.stack(kv, dim=1)  # [B, 2L, h, P, d]
        pad = filled.new_zeros(*filled.shape[:3], c.cache_len - P, c.head_dim)
        return self.head(self.head_norm(x[:, -1])), torch.cat([filled, pad], dim=3)

    def decode(self, token: torch.Tensor, position: torch.Tensor, cache: torch.Tensor, attention=None,
               inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: token [B] int64 (token n), position [1] int64 (= n, 0 .. N-2), cache [B, 2L, h, S, d]
        -> (logits of token n+1 [B, K], the cache with slot P + n written)."""
        attention = attention or _sdpa
        c = self.cfg
        slot = position.reshape(1) + c.prefix  # [1] int64
        slots = torch.arange(c.cache_len, device=token.device)
        mask = torch.where(slots <= slot, 0.0, NEG_INF).to(torch.float32).view(1, 1, 1, -1)  # attend to <= slot
        write = (slots == slot).view(1, 1, -1, 1)  # [1, 1, S, 1]
        x = (self.tok_emb(token) + self.pos_emb(slot)).unsqueeze(1)  # [B, 1, W]
        layers = []
        for i, block in enumerate(self.blocks):
            q, k, v = block.attn.split(block.ln1(x))  # [B, h, 1, d]
            if inplace:
                cache[:, 2 * i].index_copy_(2, slot, k.to(cache.dtype))
                cache[:, 2 * i + 1].index_copy_(2, slot, v.to(cache.dtype))
                keys, values = cache[:, 2 * i], cache[:, 2 * i + 1]
            else:
                keys = torch.where(write, k.to(cache.dtype), cache[:, 2 * i])
                values = torch.where(write, v.to(cache.dtype), cache[:, 2 * i + 1])
                layers += [keys, values]
            x = x + block.attn.merge(attention(q, keys.to(q.dtype), values.to(q.dtype), mask))
            x = x + block.mlp(x)
        out = cache if inplace else torch.stack(layers, dim=1)
        return self.head(self.head_norm(x[:, 0])), out


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
