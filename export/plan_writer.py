"""Checkpoint -> plan directory, atomically: `export_plan(ckpt, out_dir, precision=...)`.

    from cvqd.export import export_plan
    plan = export_plan("model.pt", "model.plan")                 # fp32 ONNX graphs + manifest, validated
    plan = export_plan("model.pt", "model-fp16.plan", precision="fp16", force=True)

The plan is built in a temporary directory next to the target (`.NAME.tmp-XXXX`) and renamed onto it only
when every graph is exported, checked and validated and the manifest is written: an interrupted or failed
export leaves no half plan, and an existing plan is replaced only with `force=True`, by an atomic exchange
of the two directories (Linux renameat2 RENAME_EXCHANGE; elsewhere two renames, the old plan kept until the
new one is complete). A `force` never deletes a directory that is not a cvqd plan.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

import cvqd
from cvqd.errors import CvqdError
from cvqd.model.contracts import contracts, exported_components
from cvqd.io import file_sha256
from cvqd.model.plan import FORMAT, MANIFEST, VERSION, Plan, PlanFile, load_plan

PRECISIONS = ("fp32", "fp16")


def export_plan(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32", *,
                clip_weights: str | os.PathLike | None = None, force: bool = False, max_images: int = 8,
                trt: bool = False, trt_options=None, progress: bool = False) -> Plan:
    """Export the components of a checkpoint to a validated plan directory; returns the loaded plan.

    Diffusion models: clip_text, clip_image, transformer, vq_decoder, vq_encoder. Autoregressive models: the same
    with ar_prefill and ar_decode (a KV-cache decode step) in place of the transformer.

    `clip_weights`: CLIP weight file for checkpoints that do not carry their CLIP (the paper preset).
    `max_images`: images sampled together at most; sets the contracts' max batch (TensorRT profiles).
    `trt`: also build TensorRT engines (needs TensorRT and a GPU; `trt_options`: a trt_build.TrtOptions).
    """
    from cvqd.model.checkpoint import load_checkpoint
    from cvqd.export.graphs import build_graph
    from cvqd.export.onnx_export import EXPORT_SAMPLE_BATCH, EXPORTER, export_graph
    from cvqd.export.validate import sample_inputs, validate_component
    from cvqd.model.clipvqd import load_model

    if precision not in PRECISIONS:
        raise CvqdError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    if not isinstance(max_images, int) or not 1 <= max_images <= 256:
        raise CvqdError(f"max_images must be an integer in 1..256, got {max_images!r}")
    env = None
    if trt:  # fail before minutes of export when TensorRT or the GPU is missing
        from cvqd.export.trt_build import require_trt

        env = require_trt()
    out_dir = Path(out_dir)
    check_target(out_dir, force)
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)  # CheckpointError on foreign/corrupt files
    if trt:
        from cvqd.export.trt_build import refuse_ar

        refuse_ar(ckpt.config.generator, ckpt_path)
    source = {"checkpoint": ckpt_path.name, "sha256": file_sha256(ckpt_path), "preset": ckpt.config.preset,
              "step": ckpt.step, "stage": ckpt.stage}
    model = load_model(ckpt, clip_weights=clip_weights)
    del ckpt  # its state dict is a second copy of every weight
    model.require_clip()
    cfg = model.cfg
    specs = contracts(cfg, max_images=max_images)

    names = exported_components(cfg)
    bar = progress_bar(progress, total=2 * len(names))
    entries: dict[str, Any] = {}
    with staging_dir(out_dir) as tmp:
        for name in names:
            contract = specs[name]
            bar.set_description(f"export {name}")
            graph = build_graph(name, model, precision)
            example = sample_inputs(contract, cfg, EXPORT_SAMPLE_BATCH, torch.Generator().manual_seed(1))
            exported = export_graph(name, graph, contract, example, tmp, precision)
            del graph
            bar.update(1)
            bar.set_description(f"validate {name}")
            parity = validate_component(name, exported.path, model, contract, precision)
            bar.update(1)
            entries[name] = {
                "contract": contract.to_dict(),
                "onnx": describe_file(tmp, exported.path),
                "external_data": [describe_file(tmp, f) for f in exported.files[1:]],
                "opset": exported.opset, "cleanup": exported.cleanup, "weight_bytes": exported.weight_bytes,
                "export_seconds": round(exported.seconds, 3), "parity": parity,
            }
        bar.close()
        tokenizer = {"kind": "open_clip", "name": cfg.clip.tokenizer, "context_length": cfg.clip.context_length}
        tok_file = write_tokenizer(tmp, cfg.clip.tokenizer, cfg.clip.context_length)
        if tok_file is not None:
            tokenizer["file"] = describe_file(tmp, tok_file)
        manifest = {
            "format": FORMAT, "version": VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "precision": precision,
            "config": cfg.to_dict(),
            "schedule": {k: getattr(cfg.diffusion, k) for k in ("num_steps", "att_1", "att_T", "ctt_1", "ctt_T")},
            "null_embedding": {"values": [float(x) for x in model.null_condition().detach().float()],
                               "normalized": cfg.sampling.normalize_null, "dtype": "float32"},
            "tokenizer": tokenizer,
            "sampling": cfg.sampling.to_dict(),
            "max_images": max_images,
            "components": entries,
            "engines": {},
            "exporter": EXPORTER,
            "versions": versions(),
            "source": source,
        }
        if env is not None:
            from cvqd.export.trt_build import build_engines

            manifest["engines"] = build_engines(tmp, manifest, env, trt_options, progress=progress)
            manifest["versions"]["tensorrt"] = env.version
        write_manifest(tmp, manifest)
    return load_plan(out_dir)


TOKENIZER_FILE = "tokenizer.json.gz"


def write_tokenizer(plan_dir: Path, name: str, context_length: int) -> Path | None:
    """The plain CLIP BPE vocabulary and merges as `tokenizer.json.gz` in the plan (read by the torch-free runtime),
    or None for tokenizers it does not reproduce (the runtime then needs open_clip)."""
    from cvqd.model.bpe import ClipBPE, plain_clip_bpe

    if not plain_clip_bpe(name):
        return None
    return ClipBPE.from_open_clip(context_length).save(plan_dir / TOKENIZER_FILE)


# --------------------------------------------------------------------------------- directory handling

def is_plan_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite without `force`, and never replace something that is not a plan (or empty dir)."""
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise CvqdError(f"{out_dir} exists and is not a directory; expected a plan directory path")
        empty = not any(out_dir.iterdir())
        if not empty and not is_plan_dir(out_dir):
            raise CvqdError(f"{out_dir} exists and is not a cvqd plan; refusing to replace it (choose another --out)")
        if not empty and not force:
            raise CvqdError(f"plan {out_dir} already exists; pass --force to replace it (the old plan stays until "
                            f"the new one is complete)")


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh directory next to `target`; on success it replaces `target` atomically, on error it vanishes."""
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as exc:
        raise CvqdError(f"cannot create a plan under {parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        _fsync_tree(tmp)  # the data is on disk before the rename makes the plan visible
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`. An existing `target` is swapped out atomically, then deleted."""
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):  # `new` now holds the old plan
        shutil.rmtree(new, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "plan")  # from here until the next rename the old plan is at old/plan
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in root.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) (Linux >= 3.15); False if unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_file(root: Path, path: Path) -> dict[str, Any]:
    return PlanFile(str(path.relative_to(root)), file_sha256(path), path.stat().st_size).to_dict()


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    path = root / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import onnxslim

    return {"cvqd": cvqd.__version__, "torch": str(torch.__version__), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "onnxslim": onnxslim.__version__, "python": platform.python_version()}


class _NoBar:
    def set_description(self, *_): ...
    def update(self, *_): ...
    def close(self): ...


def progress_bar(enabled: bool, total: int):
    """A tqdm bar on stderr, or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="step", leave=False)
