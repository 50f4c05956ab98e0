"""Image folders for training: scanning, decoding, resizing, captions, and the on-disk feature cache.

Any folder of images works (FFHQ, COCO, your own): files are found recursively by extension, decoded with
Pillow, converted to RGB and resized to the model's square resolution either by "squeeze" (the paper's resize
that ignores the aspect ratio) or "center-crop" (short side to the size, then the central square).
Unreadable or corrupt files are skipped, never a crash: a training stage names the first few of them and their
count in one warning line (`skipped_warning`), so a damaged dataset is noticed; a folder that is missing, empty
or holds no images is a one-line `CvqdError`.

Images travel as uint8 [3, S, S] tensors and become float [-1, 1] only at the model's door (`to_float`).
Small datasets are decoded once into memory (`ImageSet.preload`); large ones are decoded per batch.

`FeatureCache` stores per-image features (CLIP image embeddings, VQGAN tokens) on disk, keyed by the file
(path, size, mtime) and a digest of the model that computed them, so they are computed once and reused across
epochs and runs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

from cvqd.errors import CvqdError
from cvqd.io import atomic_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
RESIZE_MODES = ("squeeze", "center-crop")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is corrupt, not silently grey


def scan_images(root: str | os.PathLike) -> list[Path]:
    """All image files under `root` (recursive, sorted, hidden files and folders skipped)."""
    root = Path(root)
    if not root.exists():
        raise CvqdError(f"data folder not found: {root}")
    if not root.is_dir():
        raise CvqdError(f"data path {root} is not a folder; expected a folder of images ({', '.join(IMAGE_EXTS)})")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)]
    if not files:
        anything = any(True for _ in root.rglob("*"))
        what = "is empty" if not anything else "holds no image files"
        raise CvqdError(f"data folder {root} {what}; expected images with one of the extensions "
                        f"{', '.join(IMAGE_EXTS)} (searched recursively)")
    return sorted(files)


def load_image(path: str | os.PathLike, size: int, resize: str = "squeeze") -> torch.Tensor | None:
    """Decode `path` to uint8 [3, size, size], or None when the file cannot be read as an image."""
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except Exception:  # PIL raises many kinds on bad bytes (OSError, SyntaxError, ValueError, DecompressionBomb...)
        return None
    if resize == "center-crop":
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    elif resize == "squeeze":
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    else:
        raise CvqdError(f"unknown resize mode {resize!r}; expected one of {list(RESIZE_MODES)}")
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def read_captions(image_path: Path) -> list[str]:
    """Caption lines of the sidecar `<stem>.txt` (one variant per line); [] when there is none."""
    txt = image_path.with_suffix(".txt")
    if not txt.is_file():
        return []
    return [ln.strip() for ln in txt.read_text(errors="replace").splitlines() if ln.strip()]


@dataclass
class ImageSet:
    """The images of a folder at one resolution; decoding failures are skipped and counted."""

    root: Path
    files: list[Path]
    size: int
    resize: str = "squeeze"
    images: torch.Tensor | None = None  # uint8 [N, 3, S, S] once preloaded
    skipped: list[Path] = field(default_factory=list)  # files that could not be decoded

    @classmethod
    def scan(cls, root: str | os.PathLike, size: int, resize: str = "squeeze") -> "ImageSet":
        if resize not in RESIZE_MODES:
            raise CvqdError(f"unknown resize mode {resize!r}; expected one of {list(RESIZE_MODES)}")
        return cls(Path(root), scan_images(root), size, resize)

    def __len__(self) -> int:
        return len(self.files)

    def preload(self, progress: bool = False, desc: str = "decoding") -> "ImageSet":
        """Decode every file once into memory, dropping (and counting) the unreadable ones."""
        from tqdm import tqdm

        good, tensors, bad = [], [], []
        for f in tqdm(self.files, desc=desc, unit="img", disable=not progress, leave=False):
            x = load_image(f, self.size, self.resize)
            (bad.append(f) if x is None else (good.append(f), tensors.append(x)))
        if not good:
            raise CvqdError(f"none of the {len(self.files)} image files under {self.root} could be read "
                            f"(all corrupt or in an unsupported format)")
        self.files, self.skipped = good, self.skipped + bad
        self.images = torch.stack(tensors)
        return self

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 [B, 3, S, S] for `indices`; lazily decoded files that fail are replaced by the next good one."""
        if self.images is not None:
            return self.images[torch.as_tensor(list(indices), dtype=torch.long)]
        out = []
        for i in indices:
            for k in range(len(self.files)):
                j = (i + k) % len(self.files)
                x = load_image(self.files[j], self.size, self.resize)
                if x is not None:
                    out.append(x)
                    break
                if self.files[j] not in self.skipped:
                    self.skipped.append(self.files[j])
            else:
                raise CvqdError(f"no readable image under {self.root}")
        return torch.stack(out)


SKIPPED_SHOWN = 3  # paths named per kind in a skipped-files warning


def skipped_warning(prog: str, root: str | os.PathLike, groups: dict[str, Sequence[Path]],
                    shown: int = SKIPPED_SHOWN) -> str | None:
    """One line that says which files of the data folder `root` were skipped and why; None when none were.

    groups: why -> the files (e.g. {"unreadable": [...]}); each kind gives its count and its first `shown` paths
    (relative to `root`), so a damaged or mislabelled dataset is noticed and its files can be found.
    """
    root = Path(root)
    parts, total = [], 0
    for why, files in groups.items():
        if not files:
            continue
        total += len(files)
        names = []
        for f in list(files)[:shown]:
            try:
                names.append(str(Path(f).relative_to(root)))
            except ValueError:
                names.append(str(f))
        more = f", and {len(files) - shown} more" if len(files) > shown else ""
        parts.append(f"{len(files)} {why} ({', '.join(names)}{more})")
    if not total:
        return None
    return f"{prog}: warning: skipped {total} file(s) under {root}: {'; '.join(parts)}"


def should_preload(n: int, size: int, limit_bytes: int = 2 << 30) -> bool:
    """Preload when the decoded dataset fits comfortably in memory."""
    return n * 3 * size * size <= limit_bytes


# ------------------------------------------------------------------------------------------- features

def file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def state_digest(module: torch.nn.Module, extra: str = "") -> str:
    """sha256 over a module's state dict (names, shapes, dtypes, bytes): identifies the weights."""
    h = hashlib.sha256(extra.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureCache:
    """Per-file feature rows on disk: `<dir>/<kind>-<model digest>.pt` = {"keys": [...], "values": [N, ...]}."""

    def __init__(self, directory: str | os.PathLike, kind: str, model_digest: str):
        self.path = Path(directory) / f"{kind}-{model_digest[:24]}.pt"
        self.kind = kind

    def load(self) -> dict[str, torch.Tensor]:
        if not self.path.is_file():
            return {}
        try:
            d = torch.load(self.path, map_location="cpu", weights_only=True)
            return dict(zip(d["keys"], d["values"]))
        except Exception:  # a damaged cache is rebuilt, never trusted
            return {}

    def save(self, rows: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(rows)
        with atomic_path(self.path) as tmp:
            torch.save({"keys": keys, "values": torch.stack([rows[k] for k in keys])}, tmp)


def compute_features(images: ImageSet, caches: dict[str, FeatureCache],
                     encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]], batch_size: int = 64,
                     write: bool = True, progress: bool = False) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Features of every readable image of `images`, per encoder, using and filling the caches.

    encoders: name -> fn(uint8 [B, 3, S, S]) -> [B, ...] (run under no_grad by the caller's choice).
    -> (indices of the images that have features, {name: [M, ...] rows in that order}).
    Images are decoded only when some encoder's cache misses them; unreadable ones are skipped and counted
    in `images.skipped`. `write=False` (non-zero ranks) reads but never writes the cache files.
    """
    from tqdm import tqdm

    keys = [file_key(f) for f in images.files]
    known = {name: caches[name].load() for name in encoders}
    todo = [i for i, k in enumerate(keys) if any(k not in known[n] for n in encoders)]
    bad: set[int] = set()
    bar = tqdm(total=len(todo), desc="caching features", unit="img", disable=not progress or not todo, leave=False)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        decoded = [(i, images.images[i] if images.images is not None
                    else load_image(images.files[i], images.size, images.resize)) for i in idx]
        good = [(i, x) for i, x in decoded if x is not None]
        bad |= {i for i, x in decoded if x is None}
        if good:
            batch = torch.stack([x for _, x in good])
            for name, fn in encoders.items():
                out = fn(batch).detach().cpu()
                for (i, _), row in zip(good, out):
                    known[name][keys[i]] = row.clone()
        bar.update(len(idx))
    bar.close()
    if todo and write:
        for name in encoders:
            caches[name].save(known[name])
    images.skipped += [images.files[i] for i in sorted(bad) if images.files[i] not in images.skipped]
    kept = [i for i in range(len(keys)) if i not in bad]
    if not kept:
        raise CvqdError(f"none of the {len(keys)} image files under {images.root} could be read")
    return kept, {name: torch.stack([known[name][keys[i]] for i in kept]) for name in encoders}
