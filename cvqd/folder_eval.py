"""Scoring a folder of generated images the way the paper does: CLIP score and FID against reference images.

- CLIP score: the cosine similarity of each image's CLIP image embedding and its prompt's CLIP text embedding,
  averaged over the set (the paper's definition; some papers report 100 x max(cos, 0), `clip_score_100` here).
  The CLIP is the user's: an open_clip model from a weights file, or a checkpoint's own CLIP.
- FID: the Frechet distance between Inception-v3 pool features (2048-d) of the generated and the reference
  images, computed by torchmetrics (FrechetInceptionDistance over torch-fidelity's FID Inception network). The
  network's weights come from the file the user passes (the standard `pt_inception-2015-12-05-6726825d.pth`);
  nothing is downloaded. The reference statistics (feature sum, outer-product sum, count) are cached on disk,
  keyed by the reference files (names, sizes, modification times), the weights' sha256 and the feature width.
- FD in a CLIP's feature space (`fd_clip`): the same Frechet distance over CLIP image embeddings, through the same
  torchmetrics code. Useful where Inception features say little (64x64 synthetic shapes) or are unavailable.

Generated images and prompts come from a `cvqd-run` manifest (`manifest.jsonl`), or from a folder of images that
carry their prompt in their embedded parameters (every cvqd image does).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image

from cvqd.errors import CvqdError
from cvqd.io import atomic_path, file_sha256

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_FEATURES = 2048
Progress = Callable[[int, int], None]


# -------------------------------------------------------------------------------------------- inputs

def generated_set(source: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """(image path, prompt) of a generated set: `source` is a manifest file, a folder with `manifest.jsonl`, or a
    folder of images (prompt read from each file's embedded parameters; None where there is none)."""
    from cvqd.images import read_image_params
    from cvqd.runtime.shard import MANIFEST, read_manifest

    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl" or (path.is_dir() and (path / MANIFEST).is_file()):
        recs = read_manifest(path)
        missing = [r["path"] for r in recs if not Path(r["path"]).is_file()]
        if missing:
            raise CvqdError(f"{len(missing)} image(s) of manifest {path} are missing (first: {missing[0]}); "
                            f"rerun the cvqd-run command that made it (it makes only what is missing)")
        return [(Path(r["path"]), r["prompt"]) for r in recs]
    files = image_files(path, "--generated")
    out = []
    for f in files:
        try:
            prompt = read_image_params(f).get("prompt")
        except (OSError, ValueError):
            prompt = None
        out.append((f, prompt if isinstance(prompt, str) else None))
    return out


def image_files(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """The image files directly or below `folder`, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise CvqdError(f"{what} {root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise CvqdError(f"{what} {root} holds no image ({', '.join(IMAGE_EXTS)})")
    return files


def load_uint8(paths: list[Path], size: int | None = None) -> torch.Tensor:
    """[B, 3, H, W] uint8 RGB; resized (bicubic) to size x size when given or when the images differ in size."""
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except (OSError, ValueError) as exc:
            raise CvqdError(f"cannot read image {p}: {exc}") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise CvqdError(f"images differ in size ({sorted(shapes)[:2]}...); pass a common size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _batches(items: list, batch: int) -> Iterable[list]:
    for i in range(0, len(items), batch):
        yield items[i:i + batch]


# -------------------------------------------------------------------------------------------- CLIP score

@torch.no_grad()
def clip_scores(scorer, paths: list[Path], prompts: list[str], *, batch: int = 64,
                progress: Progress | None = None) -> np.ndarray:
    """Cosine of CLIP image and text embeddings per (image, prompt) -> [M] float64. `scorer`:
    cvqd.evaluation.Scorer (the user's CLIP)."""
    out, done = [], 0
    uniq = list(dict.fromkeys(prompts))
    emb = torch.cat([scorer.text(chunk) for chunk in _batches(uniq, batch)])
    row = {p: emb[i] for i, p in enumerate(uniq)}
    for chunk in _batches(list(zip(paths, prompts)), batch):
        x = load_uint8([p for p, _ in chunk]).float() / 127.5 - 1.0
        img = scorer.clip.encode_image(x.to(scorer.device))
        txt = torch.stack([row[t] for _, t in chunk]).to(img)
        out.append((img * txt).sum(-1).double().cpu())
        done += len(chunk)
        if progress:
            progress(done, len(paths))
    return torch.cat(out).numpy()


# -------------------------------------------------------------------------------------------- FID

def inception_network(weights: str | os.PathLike):
    """torchmetrics' FID Inception (torch-fidelity's network) with weights from `weights`, loaded safely.

    The file is read with weights_only=True and must be a state dict of the FID Inception network (the
    `pt_inception-2015-12-05-6726825d.pth` file torch-fidelity and pytorch-fid use). torch-fidelity's own loader
    unpickles arbitrary objects, so it is handed a re-saved copy of the validated tensors, never the user's file.
    """
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise CvqdError("FID needs torchmetrics and torch-fidelity: pip install 'cvqd[train]'") from None
    path = Path(weights)
    if not path.is_file():
        raise CvqdError(f"Inception weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unpickling failure: not a weights file)
        raise CvqdError(f"{path} is not a PyTorch weights file ({type(exc).__name__}); expected the FID Inception "
                        f"state dict pt_inception-2015-12-05-6726825d.pth") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CvqdError(f"{path} holds no state dict of tensors; expected the FID Inception weights "
                        f"(pt_inception-2015-12-05-6726825d.pth)")
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "inception.pt"
        torch.save({k: v.clone() for k, v in state.items()}, clean)
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FID_FEATURES)],
                                     feature_extractor_weights_path=str(clean))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CvqdError(f"{path} is not the FID Inception network's state dict ({first}); expected "
                            f"pt_inception-2015-12-05-6726825d.pth") from None
    return net


class ClipFeatures(torch.nn.Module):
    """uint8 images [B, 3, H, W] -> CLIP image embeddings [B, D] (the `feature` module of an FD in CLIP space)."""

    def __init__(self, scorer):
        super().__init__()
        self.clip = scorer.clip
        self.device = scorer.device
        self.num_features = int(scorer.clip.cfg.embed_dim)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x.to(self.device).float() / 127.5 - 1.0).double().cpu()


def frechet_distance(feature, generated: list[Path], reference: list[Path], *, weights_id: str, size: int | None,
                     cache_dir: str | os.PathLike | None = None, batch: int = 64, device: str = "cpu",
                     progress: Progress | None = None) -> dict[str, Any]:
    """FD between the `feature` network's features of `generated` and `reference` images (torchmetrics).

    `feature`: the torch module (inception_network / ClipFeatures); `weights_id` names its weights in the cache
    key; `size`: the side images are resized to before the network (None: as stored; they must agree).
    -> {"fd": float, "generated": n, "reference": m, "reference_cached": bool}.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(generated) < 2 or len(reference) < 2:
        raise CvqdError(f"FID needs at least 2 generated and 2 reference images, got {len(generated)} and "
                        f"{len(reference)}")
    metric = FrechetInceptionDistance(feature=feature, reset_real_features=False).to(device)
    key = _reference_key(reference, weights_id, size)
    cache = Path(cache_dir) / f"fid-ref-{key}.pt" if cache_dir is not None else None
    total, done = len(generated) + len(reference), 0
    cached = False
    if cache is not None and cache.is_file():
        try:
            st = torch.load(cache, map_location="cpu", weights_only=True)
            metric.real_features_sum = st["sum"].to(metric.real_features_sum)
            metric.real_features_cov_sum = st["cov_sum"].to(metric.real_features_cov_sum)
            metric.real_features_num_samples = st["n"].to(metric.real_features_num_samples)
            cached = True
            done += len(reference)
        except Exception:  # noqa: BLE001  (a damaged cache entry is recomputed)
            cached = False
    if not cached:
        for chunk in _batches(reference, batch):
            metric.update(load_uint8(chunk, size).to(device), real=True)
            done += len(chunk)
            if progress:
                progress(done, total)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:
                torch.save({"sum": metric.real_features_sum.cpu(), "cov_sum": metric.real_features_cov_sum.cpu(),
                            "n": metric.real_features_num_samples.cpu()}, tmp)
    for chunk in _batches(generated, batch):
        metric.update(load_uint8(chunk, size).to(device), real=False)
        done += len(chunk)
        if progress:
            progress(done, total)
    return {"fd": float(metric.compute()), "generated": len(generated), "reference": len(reference),
            "reference_cached": cached}


def _reference_key(files: list[Path], weights_id: str, size: int | None) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{weights_id}|{size}".encode())
    return h.hexdigest()[:24]


# -------------------------------------------------------------------------------------------- the report

def evaluate_folder(generated: str | os.PathLike, *, reference: str | os.PathLike | None = None,
                    scorer=None, clip_id: str = "", inception_weights: str | os.PathLike | None = None, fd_clip: bool = False,
                    size: int | None = None, cache_dir: str | os.PathLike | None = None, batch: int = 64,
                    device: str = "cpu", progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """CLIP score (with `scorer`), FID (with `inception_weights` and `reference`) and optionally the FD in the
    scorer's CLIP space, of a generated set. `clip_id` identifies the scorer's weights (a file's sha256) in the
    reference cache key. -> a JSON-ready report."""
    items = generated_set(generated)
    report: dict[str, Any] = {"generated": str(generated), "images": len(items)}
    stage = (lambda name: (lambda d, t: progress(name, d, t))) if progress else (lambda name: None)
    if scorer is not None:
        with_prompt = [(p, t) for p, t in items if t]
        if not with_prompt:
            raise CvqdError(f"no image of {generated} carries a prompt (no manifest, no embedded parameters); "
                            f"CLIP score needs the prompts")
        s = clip_scores(scorer, [p for p, _ in with_prompt], [t for _, t in with_prompt], batch=batch,
                        progress=stage("clip score"))
        report["clip_score"] = {"mean": float(s.mean()), "se": float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1
                                else None, "clip_score_100": float(100 * np.clip(s, 0, None).mean()),
                                "images": len(s), "clip": scorer.name}
    if reference is not None:
        refs = image_files(reference, "--reference")
        gen = [p for p, _ in items]
        if inception_weights is not None:
            net = inception_network(inception_weights)
            fid = frechet_distance(net, gen, refs, weights_id=file_sha256(inception_weights), size=size,
                                   cache_dir=cache_dir, batch=batch, device=device, progress=stage("fid"))
            report["fid"] = {**fid, "inception_weights": str(inception_weights)}
        if fd_clip:
            if scorer is None:
                raise CvqdError("the FD in CLIP space needs a CLIP (the scorer)")
            fd = frechet_distance(ClipFeatures(scorer), gen, refs, weights_id=f"clip|{scorer.name}|{clip_id}", size=size,
                                  cache_dir=cache_dir, batch=batch, device=device, progress=stage("fd clip"))
            report["fd_clip"] = {**fd, "clip": scorer.name}
    return report
