"""Optional perceptual (LPIPS-style) loss for VQGAN training, from weights the user passes by path.

Nothing is downloaded. `--perceptual-weights` is a torchvision VGG16 state dict (e.g. the released
`vgg16-397923af.pth`, or any file with the same `features.*` keys); `--lpips-weights` optionally adds LPIPS's
learned per-channel weights (the `vgg.pth` of the LPIPS release: `lin0.model.1.weight` ... `lin4...`). Without
the LPIPS file every channel weighs the same (a plain normalised VGG feature distance).

d(x, y) = sum_l mean_hw sum_c w_lc (f_l(x)_c / |f_l(x)| - f_l(y)_c / |f_l(y)|)^2 on the relu1_2 ... relu5_3 features.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cvqd.errors import CheckpointError
from cvqd.model.checkpoint import load_state_file

_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input scaling (inputs in [-1, 1])
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _load(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    return load_state_file(path, what, strip=("module.", "net."))


class PerceptualLoss(nn.Module):
    """Frozen VGG16 feature distance; [B, 3, H, W] images in [-1, 1] -> per-sample distance [B]."""

    def __init__(self, vgg_weights: str | os.PathLike, lpips_weights: str | os.PathLike | None = None):
        super().__init__()
        from torchvision.models import vgg16

        net = vgg16(weights=None).features[: _TAPS[-1] + 1]
        sd = _load(vgg_weights, "VGG16 weights")
        feats = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
        if not feats:  # LPIPS-style files name the slices differently; accept a bare features dict too
            feats = sd
        missing, unexpected = net.load_state_dict(feats, strict=False)
        if missing:
            raise CheckpointError(f"{vgg_weights}: not a torchvision VGG16 state dict (missing {missing[:3]}...)")
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        weights = [torch.ones(1, c, 1, 1) for c in _CHANNELS]
        if lpips_weights is not None:
            lw = _load(lpips_weights, "LPIPS weights")
            for i, c in enumerate(_CHANNELS):
                w = lw.get(f"lin{i}.model.1.weight")
                if w is None or w.numel() != c:
                    raise CheckpointError(f"{lpips_weights}: not an LPIPS VGG weight file (lin{i}.model.1.weight "
                                          f"with {c} entries expected)")
                weights[i] = w.view(1, c, 1, 1).float()
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w)

    def train(self, mode: bool = True):  # the VGG always stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = torch.zeros(x.shape[0], device=x.device)
        tap = 0
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i == _TAPS[tap]:
                fx, fy = h.chunk(2)
                fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
                fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
                total = total + ((fx - fy) ** 2 * getattr(self, f"w{tap}")).sum(1).mean((1, 2))
                tap += 1
        return total
