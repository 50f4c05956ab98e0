"""Image output: tensors -> PIL, PNG files carrying their generation parameters, contact sheets."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from cvqd.io import atomic_path

PNG_KEY = "cvqd"  # one iTXt chunk holding the JSON parameters; each field also gets its own tEXt chunk


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """images [B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def save_png(path: str | os.PathLike, image: Image.Image, params: dict[str, Any] | None = None) -> None:
    """Write a PNG atomically, with `params` in text chunks (readable by `read_png_params`)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (params or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    if params:
        info.add_itxt(PNG_KEY, json.dumps(params, sort_keys=True))
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_params(path: str | os.PathLike) -> dict[str, Any]:
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    return json.loads(text[PNG_KEY]) if PNG_KEY in text else {}


def grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """A contact sheet of equally sized images, row-major, on a white background."""
    if not images:
        raise ValueError("grid of no images")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "prompt"

