"""The CLIP-VQDiffusion denoising transformer (docs/algorithm.md#model).

No cross-attention: the CLIP embedding enters through adaptive LayerNorms. Each block is
    x = x + SelfAttn(AdaLN_t(x, t))
    x = x + MLP(AdaLN_clip(x, c))
with AdaLN(x) = LN(x) * (1 + scale) + shift (LayerNorm without affine), [scale, shift] from
Linear(SiLU(Embedding_T(t))) or Linear(SiLU(Linear(c))). The reference MLP is a 3x3 Conv2d
width -> hidden -> width on the token grid with GELU2 (x * sigmoid(1.702 x)); a token-wise linear MLP
is available too. The head is LayerNorm -> Linear(width -> K) -> log_softmax over the K real classes;
the [MASK] class gets LOG_ZERO and everything is clamped to [LOG_ZERO, 0].

Shapes: tokens [B, N] int64 (mask id K), t [B] int64, cond [B, D] -> log p(x_0) [B, K+1, N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.model.config import TransformerConfig
from cvqd.model.schedule import LOG_ZERO


class GELU2(nn.Module):
    """x * sigmoid(1.702 x), the sigmoid approximation of GELU used by the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class AdaLayerNorm(nn.Module):
    """LN(x) * (1 + scale) + shift with [scale, shift] = Linear(SiLU(embed(cond)))."""

    def __init__(self, width: int, embed: nn.Module):
        super().__init__()
        self.embed = embed  # cond -> [B, width]
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.proj = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(F.silu(self.embed(cond))).unsqueeze(1).chunk(2, dim=-1)  # [B, 1, W] each
        return self.norm(x) * (1 + scale) + shift


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, N, d]
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, N, W))


class ConvMLP(nn.Module):
    """kxk Conv2d MLP on the token grid: [B, N, W] -> [B, W, H, Wd] -> conv -> GELU2 -> conv -> [B, N, W]."""

    def __init__(self, width: int, hidden: int, kernel: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.fc1 = nn.Conv2d(width, hidden, kernel, padding=kernel // 2)
        self.act = GELU2()
        self.fc2 = nn.Conv2d(hidden, width, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        h = x.transpose(1, 2).reshape(B, W, *self.grid)
        return self.fc2(self.act(self.fc1(h))).flatten(2).transpose(1, 2)


class LinearMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), GELU2(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        w = cfg.width
        self.ln_t = AdaLayerNorm(w, nn.Embedding(cfg.num_steps, w))
        self.attn = SelfAttention(w, cfg.heads)
        self.ln_c = AdaLayerNorm(w, nn.Linear(cfg.cond_dim, w))
        self.mlp = (ConvMLP(w, cfg.mlp_hidden, cfg.mlp_kernel, tuple(cfg.grid)) if cfg.mlp == "conv"
                    else LinearMLP(w, cfg.mlp_hidden))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_t(x, t))
        return x + self.mlp(self.ln_c(x, cond))


class DiffusionTransformer(nn.Module):
    """p_theta(x_0 | x_t, t, c) over a token grid; see the module docstring."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        H, W = cfg.grid
        self.tok_emb = nn.Embedding(cfg.num_classes + 1, cfg.width)  # + [MASK] = K
        self.row_emb = nn.Embedding(H, cfg.width)
        self.col_emb = nn.Embedding(W, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)
        self.apply(_init_weights)

    def logits(self, tokens: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Unnormalised x_0 logits over the K real classes: [B, K, N]."""
        H, W = self.cfg.grid
        pos = (self.row_emb.weight[:, None, :] + self.col_emb.weight[None, :, :]).reshape(H * W, -1)  # [N, W]
        x = self.tok_emb(tokens) + pos
        for block in self.blocks:
            x = block(x, t, cond)
        return self.head(self.head_norm(x)).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p(x_0) [B, K+1, N] with the [MASK] row at LOG_ZERO, clamped to [LOG_ZERO, 0]."""
        log_p = F.log_softmax(self.logits(tokens, t, cond).float(), dim=1)
        mask_row = torch.full_like(log_p[:, :1], LOG_ZERO)
        return torch.cat([log_p, mask_row], dim=1).clamp(LOG_ZERO, 0)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
