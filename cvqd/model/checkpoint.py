"""The `model.pt` checkpoint format.

A checkpoint is a plain dict readable with `torch.load(weights_only=True)` (tensors, numbers, strings,
lists, dicts; never arbitrary pickled objects):

    format: "cvqd-checkpoint", version: 1
    config:  ModelConfig.to_dict()
    state:   {"vqgan": sd, "transformer": sd, "null_embedding": [D] tensor, "clip": sd or None, ...}
    step:    training step, stage: "init" | "vqgan" | "diffusion" | "cfg" | ...
    meta:    cvqd/torch versions, weights dtype, CLIP weight source, free-form notes
    training: optional resume state (optimizer, EMA, RNG, importance sampler), never needed for inference

Writes are atomic (temporary file + rename). Files that are not cvqd checkpoints, or of a newer
format version, are rejected with a `CheckpointError` that says so.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import cvqd
from cvqd.model.config import ModelConfig
from cvqd.errors import CheckpointError, ConfigError
from cvqd.io import atomic_path

FORMAT = "cvqd-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    config: ModelConfig
    state: dict[str, Any]
    step: int = 0
    stage: str = "init"
    meta: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None


def _cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: _cast_floats(v, dtype) for k, v in tree.items()}
    return tree


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint, *, weights_dtype: torch.dtype = torch.float32) -> None:
    """Write `ckpt` atomically. `weights_dtype=torch.float16` halves the model weights (not the training state)."""
    state = {k: _cast_floats(v, weights_dtype) for k, v in ckpt.state.items()}
    meta = {"cvqd_version": cvqd.__version__, "torch_version": str(torch.__version__), **ckpt.meta,
            "weights_dtype": str(weights_dtype).removeprefix("torch.")}
    payload = {"format": FORMAT, "version": VERSION, "config": ckpt.config.to_dict(), "state": state,
               "step": int(ckpt.step), "stage": ckpt.stage, "meta": meta, "training": ckpt.training}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint with `weights_only=True`; model weights come back as float32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsupported = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln]
        if not unsupported:  # not a pickle torch can parse at all (plain text, other binary formats)
            raise CheckpointError(f"{path} is not a cvqd checkpoint (not a readable PyTorch file)") from None
        what = unsupported[0].split(" was not")[0].removeprefix("WeightsUnpickler error: ")
        raise CheckpointError(f"{path} is not a cvqd checkpoint: it holds objects beyond tensors and plain "
                              f"containers, which cvqd never unpickles ({what[:120]})") from None
    except Exception:  # torch.load raises many kinds on foreign bytes (KeyError, RuntimeError, EOFError...)
        raise CheckpointError(unreadable_reason(path)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = f"keys {sorted(map(str, payload))[:6]}" if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a cvqd checkpoint (expected format {FORMAT!r}, found {what})")
    version = payload.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid checkpoint version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than this cvqd supports "
                              f"({VERSION}); upgrade cvqd to read it")
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{path}: invalid model config in checkpoint: {exc}") from None
    state = payload.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint has no model state")
    return Checkpoint(config=config, state=_cast_floats(state, torch.float32), step=int(payload.get("step", 0)),
                      stage=str(payload.get("stage", "")), meta=dict(payload.get("meta") or {}),
                      training=payload.get("training"))


def unreadable_reason(path: Path) -> str:
    """Why torch.load could not read `path`, in the user's terms (never the library's internal message): empty,
    a damaged or cut-short archive, or something that is not a PyTorch file at all."""
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes); expected a cvqd checkpoint (a PyTorch file written by cvqd-train)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # the zip container of torch.save
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            names = None
        if names is not None and not any(n.endswith("data.pkl") for n in names):
            return f"{path} is a zip archive but not a PyTorch file ({len(names)} entries, no data.pkl)"
        return (f"{path} is a damaged or truncated PyTorch file ({size} bytes; its archive cannot be read); copy or "
                f"save the checkpoint again")
    return f"{path} is not a cvqd checkpoint (its {size} bytes are not a PyTorch file written by torch.save)"


def load_state_file(path: str | os.PathLike, what: str, *, torchscript: bool = False,
                    strip: tuple[str, ...] = ("module.",)) -> dict[str, torch.Tensor]:
    """A state dict from a third-party weight file (CLIP, VGG, LPIPS), loaded without unpickling any object.

    Accepts a plain state dict or a training checkpoint holding one under "state_dict"; with `torchscript`, also a
    TorchScript archive (OpenAI's CLIP releases), whose weights `torch.jit.load` reads on the CPU. Key prefixes in
    `strip` (DataParallel's "module.") are removed; non-tensor entries are dropped. One-line CheckpointError on a
    missing or unreadable file, naming `what` it should have been.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        sd = None
        if torchscript:
            try:
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception:
                sd = None
        if sd is None:
            kinds = "a PyTorch state dict" + (" or a TorchScript archive" if torchscript else "")
            raise CheckpointError(f"{path} is not a readable {what} file (expected {kinds})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}
    if not tensors:
        raise CheckpointError(f"{path} does not hold a state dict of tensors ({what})")
    out = {}
    for k, v in tensors.items():
        for prefix in strip:
            k = k.removeprefix(prefix)
        out[k] = v
    return out
