"""The shapes benchmark: a procedural, seeded dataset of 64x64 images nobody wrote captions for, in miniature.

One flat-coloured shape on a flat background. Attributes (each image draws one of each):

    colour      red, green, blue, yellow, purple, orange
    shape       circle, square, triangle (apex up)
    size        small (~20 px), large (~32 px)
    position    left, right, top, bottom, center
    background  white, black

Sizes and positions jitter by a pixel or two so no two images are identical. Image `i` of a dataset with seed
`s` depends on (s, i) only, so any split or subset renders the same way on every machine.

Captions ("a small red circle on the left") are written only for training the small CLIP of this domain; the
VQGAN and the generator never see them. The combinations in `HELD_OUT` (purple triangle, orange square, green
circle) are left out of the VQGAN/generator training images: they test whether language-free training
generalises to descriptions outside the training images.

`analyze(image)` reads the attributes back from an image without any learned model: background from the border,
foreground = the largest connected blob far from the background colour, colour = nearest palette colour of the
blob's interior, shape = best overlap with a circle / square / triangle fitted to the blob's bounding box,
size = the bounding box's geometric-mean side, position = nearest anchor to the bounding box's centre.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from cvqd.errors import CvqdError

RES = 64
COLOURS: dict[str, tuple[int, int, int]] = {  # every pair >= ~120 apart in RGB, so blur does not flip them
    "red": (230, 25, 25), "green": (20, 180, 40), "blue": (25, 70, 235),
    "yellow": (245, 245, 60), "purple": (165, 40, 215), "orange": (255, 140, 0),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 20.0, "large": 32.0}  # side of the bounding square, in pixels (>= 2.5 tokens of an f=8 VQGAN)
POSITIONS: dict[str, tuple[float, float]] = {  # centre (x, y) of the bounding square
    "left": (18.0, 32.0), "right": (46.0, 32.0), "top": (32.0, 18.0), "bottom": (32.0, 46.0), "center": (32.0, 32.0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "center": "in the center"}
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("orange", "square"), ("green", "circle")})
SPLITS = ("train", "heldout", "all")
# What a caption that leaves the size or the position unnamed shows (Attributes.captions)
DEFAULT_SIZE = "large"
DEFAULT_POSITION = "center"
# The first seed of each split of the benchmark (cvqd.evaluation.split_prompts): candidate j of a prompt uses seed + j
SPLIT_SEEDS = {"validation": 0, "test": 1000}
CAPTION_TEMPLATES = ("{}", "a picture of {}", "a photo of {}", "an image of {}")  # rephrasings CLIP trains on

SIZE_JITTER = 1.0  # +- pixels on the side
POS_JITTER = 1.5  # +- pixels on each coordinate of the centre
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT

    def caption(self, background: bool = False) -> str:
        """The full caption, e.g. "a small red circle on the left" (+ ", on a black background")."""
        text = f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASE[self.position]}"
        return text + f" on a {self.background} background" if background else text

    def captions(self) -> list[str]:
        """Caption variants for CLIP training: the full caption, with its background, partial descriptions, each
        also in the rephrasings of CAPTION_TEMPLATES.

        A description may leave the size or the position unnamed only when the image shows the default
        (DEFAULT_SIZE, DEFAULT_POSITION): "a red circle" describes large red circles in the center. A prompt that
        names fewer attributes then embeds near one definite kind of image, which the generator draws coherently;
        described by every image it would embed at their mean, from which the generator, trained on single
        images' embeddings, draws blends of sizes and places (docs/experiments.md).
        """
        c, s, where = self.colour, self.shape, POSITION_PHRASE[self.position]
        bg = f"on a {self.background} background"
        plain = [self.caption(), self.caption(background=True)]
        if self.size == DEFAULT_SIZE:
            plain.append(f"a {c} {s} {where}")
        if self.position == DEFAULT_POSITION:
            plain.append(f"a {self.size} {c} {s}")
        if self.size == DEFAULT_SIZE and self.position == DEFAULT_POSITION:
            plain += [f"a {c} {s}", f"a {c} {s} {bg}"]
        return [t.format(p) for p in plain for t in CAPTION_TEMPLATES]


@dataclass(frozen=True)
class ShapeSample:
    attrs: Attributes
    centre: tuple[float, float]
    side: float


def _in_split(colour: str, shape: str, split: str) -> bool:
    held = (colour, shape) in HELD_OUT
    return split == "all" or (split == "heldout") == held


def sample_spec(seed: int, index: int, split: str = "all") -> ShapeSample:
    """The attributes and geometry of image `index` (a function of seed and index only)."""
    if split not in SPLITS:
        raise CvqdError(f"unknown shapes split {split!r}; expected one of {list(SPLITS)}")
    rng = np.random.default_rng([seed, index])
    combos = [(c, s) for c in COLOURS for s in SHAPES if _in_split(c, s, split)]
    colour, shape = combos[rng.integers(len(combos))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    side = SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    ax, ay = POSITIONS[position]
    centre = (ax + rng.uniform(-POS_JITTER, POS_JITTER), ay + rng.uniform(-POS_JITTER, POS_JITTER))
    return ShapeSample(Attributes(colour, shape, size, position, background), centre, side)


def render(sample: ShapeSample) -> Image.Image:
    """A 64x64 RGB image of `sample` (drawn at 4x, box-filtered down for anti-aliased edges)."""
    k = SUPERSAMPLE
    a = sample.attrs
    im = Image.new("RGB", (RES * k, RES * k), BACKGROUNDS[a.background])
    draw = ImageDraw.Draw(im)
    cx, cy, h = sample.centre[0] * k, sample.centre[1] * k, sample.side * k / 2
    fill = COLOURS[a.colour]
    if a.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif a.shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    return im.resize((RES, RES), Image.Resampling.BOX)


def render_attributes(attrs: Attributes) -> Image.Image:
    """The canonical (un-jittered) image of a set of attributes."""
    return render(ShapeSample(attrs, POSITIONS[attrs.position], SIZES[attrs.size]))


def iter_samples(count: int, seed: int = 0, split: str = "all", start: int = 0) -> Iterator[tuple[int, ShapeSample]]:
    for i in range(start, start + count):
        yield i, sample_spec(seed, i, split)


def render_folder(out: str | os.PathLike, count: int, seed: int = 0, split: str = "train", captions: bool = False,
                  progress: bool = True) -> Path:
    """Write `count` images (and optionally `.txt` captions, one variant per line) to a new folder `out`.

    The folder is built under a temporary name and renamed into place, so it appears whole or not at all.
    Files are spread over sub-folders of 1000 (`00000/000123.png`).
    """
    import shutil
    import tempfile

    from tqdm import tqdm

    out = Path(out)
    if count < 1:
        raise CvqdError(f"count must be >= 1, got {count}")
    if out.exists():
        raise CvqdError(f"{out} already exists; choose a new folder (the dataset is written whole or not at all)")
    parent = out.parent if str(out.parent) else Path(".")
    try:  # missing parents are created, like `mkdir -p`
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CvqdError(f"cannot write {out}: {exc.strerror or exc}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        for i, spec in tqdm(iter_samples(count, seed, split), total=count, desc=f"shapes {split}", unit="img",
                            disable=not progress, leave=False):
            sub = tmp / f"{i // 1000:05d}"
            sub.mkdir(exist_ok=True)
            render(spec).save(sub / f"{i:06d}.png", format="PNG")
            if captions:
                (sub / f"{i:06d}.txt").write_text("\n".join(spec.attrs.captions()) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes a private folder; give it the usual permissions
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ prompt sets

def all_attribute_sets() -> list[Attributes]:
    """Every combination except the background (prompts leave it free): 6 x 3 x 2 x 5 = 180."""
    return [Attributes(c, s, z, p, "any") for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)]


def benchmark_prompts() -> list[tuple[str, Attributes]]:
    """The evaluation prompt set: one full prompt per (colour, shape, size, position); 150 in-distribution
    colour/shape pairs' prompts and 30 held-out ones."""
    return [(a.caption(), a) for a in all_attribute_sets()]


def parse_prompt(prompt: str) -> dict[str, str]:
    """Attributes named in a prompt (any subset), e.g. {"colour": "red", "shape": "circle"}; a background only as
    "<white|black> background"."""
    words = prompt.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    for key, names in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS),):
        hits = [w for w in words if w in names]
        if key == "position":
            hits = [w for w in words if w in POSITIONS or w == "centre"]
            hits = ["center" if w == "centre" else w for w in hits]
        if hits:
            found[key] = hits[0]
    for before, word in zip(words, words[1:]):  # "on a black background"
        if word == "background" and before in BACKGROUNDS:
            found["background"] = before
    return found


# -------------------------------------------------------------------------------------------- analyzer

_BG_THRESHOLD = 90.0  # RGB distance from the background that counts as foreground (every palette colour is >= ~185 away)
_MIN_AREA = 12  # pixels; smaller blobs are noise, not a shape
_SIZE_SPLIT = 26.0  # geometric-mean side of the bounding box between small (~20) and large (~32)


@dataclass(frozen=True)
class Verdict:
    """What the analyzer sees; None where nothing shape-like was found."""

    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    background: str
    area: int
    scores: dict[str, float]  # template IoU per shape

    def as_dict(self) -> dict:
        return asdict(self)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean [H, W] mask (min-label propagation, numpy only)."""
    H, W = mask.shape
    big = H * W + 1
    labels = np.where(mask, np.arange(H * W).reshape(H, W), big)
    while True:
        cur = labels.copy()
        cur[1:, :] = np.minimum(cur[1:, :], labels[:-1, :])
        cur[:-1, :] = np.minimum(cur[:-1, :], labels[1:, :])
        cur[:, 1:] = np.minimum(cur[:, 1:], labels[:, :-1])
        cur[:, :-1] = np.minimum(cur[:, :-1], labels[:, 1:])
        cur = np.where(mask, cur, big)
        if np.array_equal(cur, labels):
            break
        labels = cur
    ids, counts = np.unique(labels[mask], return_counts=True)
    if len(ids) == 0:
        return np.zeros_like(mask)
    return labels == ids[np.argmax(counts)]


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal masks of each shape filling an h x w box (pixel centres inside the shape)."""
    y = (np.arange(h) + 0.5)[:, None] / h  # [h, 1] in (0, 1)
    x = (np.arange(w) + 0.5)[None, :] / w
    circle = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    square = np.ones((h, w), dtype=bool)
    triangle = np.abs(x - 0.5) <= y / 2  # apex at the top centre, base along the bottom
    return {"circle": circle, "square": square, "triangle": triangle}


def analyze(image: Image.Image | np.ndarray) -> Verdict:
    """Read colour, shape, size, position and background back from an RGB image (no learned model)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise CvqdError(f"analyze expects an RGB image [H, W, 3], got shape {arr.shape}")
    H, W, _ = arr.shape
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3),
                             arr[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda n: np.linalg.norm(bg_rgb - np.array(BACKGROUNDS[n])))
    dist = np.linalg.norm(arr - np.array(BACKGROUNDS[background], dtype=np.float32), axis=2)  # [H, W]
    blob = _largest_component(dist > _BG_THRESHOLD)
    area = int(blob.sum())
    if area < _MIN_AREA:
        return Verdict(None, None, None, None, background, area, {})
    # colour: median of the blob's interior (pixels whose 4 neighbours are in the blob), past anti-aliased edges
    inner = blob.copy()
    inner[1:, :] &= blob[:-1, :]
    inner[:-1, :] &= blob[1:, :]
    inner[:, 1:] &= blob[:, :-1]
    inner[:, :-1] &= blob[:, 1:]
    pix = arr[inner] if inner.sum() >= 4 else arr[blob]
    rgb = np.median(pix, axis=0)
    colour = min(COLOURS, key=lambda n: np.linalg.norm(rgb - np.array(COLOURS[n])))
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = blob[y0:y1, x0:x1]
    scores = {}
    for name, tmpl in _templates(y1 - y0, x1 - x0).items():
        scores[name] = float((crop & tmpl).sum() / max(1, (crop | tmpl).sum()))
    shape = max(scores, key=scores.get)
    side = float(np.sqrt((y1 - y0) * (x1 - x0))) * RES / max(H, W)
    size = "small" if side < _SIZE_SPLIT else "large"
    cx, cy = (x0 + x1) / 2 * RES / W, (y0 + y1) / 2 * RES / H
    position = min(POSITIONS, key=lambda n: (POSITIONS[n][0] - cx) ** 2 + (POSITIONS[n][1] - cy) ** 2)
    return Verdict(colour, shape, size, position, background, area, scores)


def judge(verdict: Verdict, wanted: dict[str, str]) -> dict[str, bool]:
    """Per named attribute: does the verdict match what the prompt asked for?"""
    return {k: getattr(verdict, k) == v for k, v in wanted.items()}
