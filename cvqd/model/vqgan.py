"""Gumbel-softmax VQGAN tokenizer (taming-transformers GumbelVQ architecture) and a PatchGAN discriminator.

Images are float [B, 3, H, W] in [-1, 1]. `encode(images) -> tokens [B, N]` picks the most likely code
per cell (deterministic, as at inference in the paper); `decode(tokens) -> images`. In training,
`forward(images, temperature)` quantizes with a Gumbel-softmax relaxation: the latent is the
soft-one-hot-weighted sum of codebook vectors, with a KL(q(z|x) || uniform) regulariser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvqd.model.config import VQGANConfig


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)


def _conv3(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a 3x3 stride-1 padding-1 conv. On a 1x1 map only its centre tap meets data (the other eight see
    the zero padding), so it runs as the matrix product it is: the cell encoder's 1x1 bottleneck (the last level,
    the mid block and conv_out) costs ~9x fewer multiply-adds, with the same outputs and gradients (the other taps'
    gradients are zero either way)."""
    if x.shape[-2:] == (1, 1):
        w = conv.weight[:, :, 1, 1]
        return F.linear(x.flatten(1), w, conv.bias).reshape(x.shape[0], w.shape[0], 1, 1)
    return conv(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _conv3(self.conv1, F.silu(self.norm1(x)))
        h = _conv3(self.conv2, F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over H*W positions."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [B,1,HW,C]
        if H * W == 1:
            # One position (the cell encoder's 1x1 bottleneck): softmax over a single key is 1, so attention is v.
            # Said directly, because CUDA's memory-efficient attention has no kernel for this shape and fails
            # with "cutlassF: no kernel found to launch!".
            h = v.reshape(B, C, H, W)
        else:
            h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _stage(c_in: int, c_out: int, n: int, attn: bool, groups: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    blocks = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n))
    attns = nn.ModuleList(AttnBlock(c_out, groups) for _ in range(n)) if attn else nn.ModuleList()
    return blocks, attns


def _run_stage(x: torch.Tensor, blocks: nn.ModuleList, attns: nn.ModuleList) -> torch.Tensor:
    for i, block in enumerate(blocks):
        x = block(x)
        if len(attns):
            x = attns[i](x)
    return x


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.levels = nn.ModuleList()
        res, c_in = cfg.resolution, cfg.ch
        for i, c in enumerate(chs):
            level = nn.Module()
            level.blocks, level.attns = _stage(c_in, c, cfg.num_res_blocks, res in cfg.attn_resolutions, g)
            level.down = Downsample(c) if i < len(chs) - 1 else nn.Identity()
            self.levels.append(level)
            c_in, res = c, (res // 2 if i < len(chs) - 1 else res)
        self.mid = nn.Sequential(ResnetBlock(c_in, c_in, g), AttnBlock(c_in, g), ResnetBlock(c_in, c_in, g))
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)
        self.cell = cfg.downsample if cfg.encoder_scope == "cell" else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cell:  # each f x f cell on its own (a batch of cells), then back on the token grid
            B, C, H, W = x.shape
            f = self.cell
            cells = x.reshape(B, C, H // f, f, W // f, f).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, f, f)
            z = self._encode(cells)  # [B*h*w, Z, 1, 1]
            return z.reshape(B, H // f, W // f, -1).permute(0, 3, 1, 2)
        return self._encode(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level.down(_run_stage(h, level.blocks, level.attns))
        return _conv3(self.conv_out, F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        c_in, res = chs[-1], cfg.resolution // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(c_in, c_in, g), AttnBlock(c_in, g), ResnetBlock(c_in, c_in, g))
        self.levels = nn.ModuleList()
        n = cfg.num_res_blocks + 1 if cfg.decoder_res_blocks is None else cfg.decoder_res_blocks
        for i, c in reversed(list(enumerate(chs))):
            level = nn.Module()
            level.blocks, level.attns = _stage(c_in, c, n, res in cfg.attn_resolutions, g)
            level.up = Upsample(c) if i > 0 else nn.Identity()
            self.levels.append(level)
            c_in, res = c, (res * 2 if i > 0 else res)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level.up(_run_stage(h, level.blocks, level.attns))
        return self.conv_out(F.silu(self.norm_out(h)))


class GumbelQuantizer(nn.Module):
    """1x1 conv to K code logits; Gumbel-softmax relaxation in training, argmax at inference."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.n_embed, self.kl_weight = cfg.n_embed, cfg.kl_weight
        self.proj = nn.Conv2d(cfg.z_channels, cfg.n_embed, 1)
        self.embed = nn.Embedding(cfg.n_embed, cfg.embed_dim)

    def forward(self, z: torch.Tensor, temperature: float, hard: bool = False, noise_scale: float = 1.0):
        """-> (z_q [B, E, h, w], kl loss scalar, logits [B, K, h, w]).

        `noise_scale` multiplies the Gumbel noise: 1 is the standard Gumbel-softmax (a sample of softmax(logits)
        in the forward when `hard`); annealing it towards 0 makes the training forward converge on the argmax
        codes that `encode` uses at inference (see VQGANTrainConfig.noise_final).
        """
        logits = self.proj(z)
        if noise_scale == 1.0:
            soft = F.gumbel_softmax(logits, tau=temperature, dim=1, hard=hard)
        else:
            gumbels = -torch.empty_like(logits).exponential_().log()  # same RNG draws as F.gumbel_softmax
            soft = ((logits + noise_scale * gumbels) / temperature).softmax(dim=1)
            if hard:
                one_hot = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
                soft = one_hot - soft.detach() + soft
        z_q = torch.einsum("bkhw,ke->behw", soft, self.embed.weight)
        qy = F.softmax(logits, dim=1)
        kl = self.kl_weight * (qy * torch.log(qy * self.n_embed + 1e-10)).sum(dim=1).mean()
        return z_q, kl, logits

    def lookup(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens [B, N] -> z_q [B, E, h, w]."""
        return self.embed(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantize = GumbelQuantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, images: torch.Tensor, temperature: float):
        """Training pass: -> (reconstruction [B, 3, H, W], KL loss, code logits [B, K, h, w])."""
        z_q, kl, logits = self.quantize(self.encoder(images), temperature)
        return self.decoder(self.post_quant_conv(z_q)), kl, logits

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> tokens [B, N] int64 (most likely code per cell)."""
        return self.quantize.proj(self.encoder(images)).argmax(dim=1).flatten(1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] int64 -> images [B, 3, H, W], nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(tokens, self.cfg.token_grid)))


class PatchDiscriminator(nn.Module):
    """pix2pix/taming NLayerDiscriminator: `layers` stride-2 convs, then two stride-1 convs to patch logits."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ndf = cfg.disc_ch
        seq: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, cfg.disc_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < cfg.disc_layers else 1
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                    nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
