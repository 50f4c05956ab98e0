"""Image output: tensors -> PIL, PNG files carrying their generation parameters, contact sheets."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from cvqd.io import atomic_path

PNG_KEY = "cvqd"  # one iTXt chunk holding the JSON parameters; each field also gets its own tEXt chunk
EXIF_DESCRIPTION = 0x010E  # JPEG: the JSON parameters in EXIF ImageDescription (ASCII: the JSON escapes non-ASCII)
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
JPEG_QUALITY = 95


def image_format(path: str | os.PathLike) -> str:
    """"PNG" or "JPEG" from a file name's extension; CvqdError for anything else."""
    from cvqd.errors import CvqdError

    ext = os.path.splitext(str(path))[1].lower()
    if ext not in FORMATS:
        raise CvqdError(f"cannot write {os.fspath(path)}: unknown image extension {ext or '(none)'!r}; expected "
                        f".png, .jpg or .jpeg")
    return FORMATS[ext]


def _png_info(params: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in params.items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    info.add_itxt(PNG_KEY, json.dumps(params, sort_keys=True))
    return info


def _exif(params: dict[str, Any]) -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_DESCRIPTION] = json.dumps({PNG_KEY: params}, sort_keys=True)
    return exif


class TaggedImage(Image.Image):
    """A PIL image that knows its generation parameters (`image.info["cvqd"]`, a dict) and writes them on
    `save`: PNG text chunks, or EXIF ImageDescription for JPEG (unless the caller passes its own pnginfo/exif)."""

    def save(self, fp, format=None, **params):  # noqa: A002  (PIL's signature)
        tags = self.info.get(PNG_KEY)
        if isinstance(tags, dict):
            fmt = (format or FORMATS.get(os.path.splitext(str(getattr(fp, "name", fp)))[1].lower(), "")).upper()
            if fmt == "PNG":
                params.setdefault("pnginfo", _png_info(tags))
            elif fmt in ("JPEG", "JPG"):
                params.setdefault("exif", _exif(tags))
        return super().save(fp, format, **params)


def tag_image(image: Image.Image, params: dict[str, Any]) -> Image.Image:
    """Attach generation parameters to `image` in place (image.info["cvqd"] and one info entry per field) and make
    `image.save` write them. Derived images (resize, crop) are plain PIL images without them."""
    image.info[PNG_KEY] = dict(params)
    for key, value in params.items():
        image.info.setdefault(str(key), value)
    image.__class__ = TaggedImage
    return image


def to_pil(images) -> list[Image.Image]:
    """images [B, 3, H, W] in [-1, 1] (numpy array or torch tensor) -> RGB PIL images (round half to even)."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)  # torch or numpy
    x = x.astype(np.float32)
    arr = np.round((np.clip(x, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr.transpose(0, 2, 3, 1)]


def save_image(path: str | os.PathLike, image: Image.Image, params: dict[str, Any] | None = None) -> None:
    """Write a PNG or JPEG (by extension) atomically, with `params` embedded (readable by `read_image_params`)."""
    fmt = image_format(path)
    extra: dict[str, Any] = {}
    if params:
        extra = {"pnginfo": _png_info(params)} if fmt == "PNG" else {"exif": _exif(params)}
    if fmt == "JPEG":
        extra["quality"] = JPEG_QUALITY
    with atomic_path(path, suffix=os.path.splitext(str(path))[1]) as tmp:
        Image.Image.save(image, tmp, format=fmt, **extra)


def save_png(path: str | os.PathLike, image: Image.Image, params: dict[str, Any] | None = None) -> None:
    """Write a PNG atomically, with `params` in text chunks (readable by `read_image_params`)."""
    info = {"pnginfo": _png_info(params)} if params else {}
    with atomic_path(path, suffix=".png") as tmp:
        Image.Image.save(image, tmp, format="PNG", **info)


def read_image_params(path: str | os.PathLike) -> dict[str, Any]:
    """The generation parameters embedded by `save_image` (PNG text chunk or JPEG EXIF), {} if none."""
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
        if PNG_KEY in text:
            return json.loads(text[PNG_KEY])
        desc = im.getexif().get(EXIF_DESCRIPTION)
    try:
        return json.loads(desc).get(PNG_KEY, {}) if desc else {}
    except (ValueError, AttributeError):
        return {}


read_png_params = read_image_params


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

