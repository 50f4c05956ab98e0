"""The plan directory: manifest schema and the READING side (the runtime never imports cvqd.export/training).

A plan is what `cvqd-export` makes of a checkpoint: one ONNX graph per component (plus TensorRT engines
where they were built) and a `manifest.json` that describes everything the runtime needs:

    format "cvqd-plan", version 1
    config        ModelConfig.to_dict() (VQGAN, transformer, diffusion schedule, CLIP, sampling defaults)
    schedule      the mask-and-replace parameters (num_steps, att_1, att_T, ctt_1, ctt_T), for readers
    null_embedding {"values": [D floats], "normalized": bool}: the null condition exactly as sampling uses it (the
                  learned embedding L2-normalised, or raw for converted official models)
    tokenizer     {"kind": "open_clip", "name": ..., "context_length": ..., "file": {file, sha256, size}}: the
                  open_clip tokenizer name, and (plain CLIP BPE) its vocabulary and merges in tokenizer.json.gz,
                  which the runtime reads without open_clip (cvqd/model/bpe.py); plans without "file" need open_clip
    precision     "fp32" | "fp16" (graph I/O is always int64/float32: fp16 plans cast inside the graphs)
    components    per component: its I/O contract, the ONNX file (+ external data files) with sha256 and size,
                  the opset, the clean-up applied, and the parity results measured at export time
    engines       per component (when built): TensorRT engine file, TensorRT version, compute capability, GPU
    exporter, versions, source (checkpoint sha256, step, stage), created

    from cvqd.model.plan import load_plan
    plan = load_plan("plan/")                   # manifest checks + every listed file present with its size
    path = plan.onnx_path("transformer")        # sha256 of the file (and its external data) checked on first use

Integrity checks: `load_plan` checks the manifest and that every listed file exists with the recorded
size (cheap, catches missing or truncated files). The sha256 of a file is checked lazily, the first time
`onnx_path`/`engine_path` hands it out (so a 2 GB transformer is hashed only by a reader that uses it), or
for every file at once with `load_plan(path, verify=True)` / `plan.verify()`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvqd.model.config import ModelConfig, SamplingConfig
from cvqd.errors import ConfigError, CvqdError
from cvqd.io import file_sha256
from cvqd.model.contracts import KNOWN, Contract, required_components

FORMAT = "cvqd-plan"
VERSION = 1
MANIFEST = "manifest.json"
REBUILD_HINT = "cvqd-export --plan {plan} --trt --force"


class PlanError(CvqdError):
    """A plan directory that cannot be used: missing, unreadable, foreign, newer, corrupt or mismatched."""


@dataclass(frozen=True)
class PlanFile:
    """A file of the plan, relative to the plan directory, with its expected sha256 and size."""

    file: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlanFile":
        return cls(str(d["file"]), str(d["sha256"]), int(d["size"]))


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "open_clip"
    name: str  # open_clip tokenizer name, e.g. "ViT-B-32"
    context_length: int
    file: PlanFile | None = None  # the BPE vocabulary and merges (tokenizer.json.gz), None in older plans


@dataclass(frozen=True)
class ComponentEntry:
    name: str
    contract: Contract
    onnx: PlanFile
    external_data: tuple[PlanFile, ...]  # tensors stored beside the graph (large models), loaded with it
    opset: int
    cleanup: str  # what cleaned the graph (onnxslim, or onnx shape inference for very large graphs)
    parity: dict[str, Any]

    @property
    def files(self) -> tuple[PlanFile, ...]:
        return (self.onnx, *self.external_data)


@dataclass(frozen=True)
class EngineEntry:
    """A TensorRT engine: tied to the TensorRT version and the GPU architecture it was built with."""

    component: str
    engine: PlanFile
    trt_version: str
    compute_capability: str  # "9.0"
    gpu_name: str
    precision: str
    profile: dict[str, Any]  # {"min": b, "opt": b, "max": b} batch sizes of the optimization profile

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")


@dataclass
class Plan:
    root: Path
    version: int
    config: ModelConfig
    precision: str
    contracts: dict[str, Contract]
    components: dict[str, ComponentEntry]
    null_embedding: np.ndarray  # [D] float32: the null condition exactly as used in sampling (L2-normalised unless
    # the model's sampling.normalize_null is False: converted official models use it raw)
    tokenizer: TokenizerSpec
    engines: dict[str, EngineEntry]
    versions: dict[str, Any]
    exporter: dict[str, Any]
    source: dict[str, Any]
    created: str
    manifest: dict[str, Any]  # the raw manifest
    _verified: set[str] = field(default_factory=set, repr=False)
    rebuild_hint: str = ""  # how to rebuild this plan, when its maker knows ("rebuild it with cvqd-export ...")

    @property
    def sampling(self) -> SamplingConfig:
        """Default sampling settings chosen for this model (steps, guidance, truncation)."""
        return self.config.sampling

    @property
    def model_id(self) -> str:
        """A short id of the model weights (the source checkpoint's sha256 prefix)."""
        return str(self.source.get("sha256", ""))[:12]

    # ----------------------------------------------------------------------------------- file access

    def onnx_path(self, component: str) -> Path:
        """Absolute path of a component's ONNX graph; its sha256 (and its external data's) checked on first use."""
        entry = self._component(component)
        for f in entry.files:
            self._check_hash(f)
        return self.root / entry.onnx.file

    def engine_path(self, component: str) -> Path:
        """Absolute path of a component's TensorRT engine (sha256 checked on first use).

        Call `check_engines(plan)` first: it says whether the engines fit this GPU and TensorRT.
        """
        if component not in self.engines:
            raise PlanError(f"plan {self.root} has no TensorRT engine for {component!r}; build the engines with: "
                            f"cvqd-export --plan {self.root} --trt")
        self._check_hash(self.engines[component].engine)
        return self.root / self.engines[component].engine.file

    def files(self) -> list[PlanFile]:
        out = [f for c in self.components.values() for f in c.files]
        if self.tokenizer.file is not None:
            out.append(self.tokenizer.file)
        return out + [e.engine for e in self.engines.values()]

    def tokenizer_path(self) -> Path | None:
        """The plan's BPE vocabulary file (sha256 checked on first use), or None when the plan has none."""
        f = self.tokenizer.file
        if f is None:
            return None
        self._check_hash(f)
        return self.root / f.file

    def verify(self) -> None:
        """Check the sha256 of every file of the plan (ONNX graphs, external data, engines)."""
        for f in self.files():
            self._check_hash(f)

    def _component(self, component: str) -> ComponentEntry:
        if component not in self.components:
            raise PlanError(f"plan {self.root} has no component {component!r}; it has {sorted(self.components)}")
        return self.components[component]

    def _check_hash(self, f: PlanFile) -> None:
        if f.file in self._verified:
            return
        got = file_sha256(self.root / f.file)
        if got != f.sha256:
            fix = self.rebuild_hint or "re-export it with cvqd-export --ckpt MODEL.pt --out PLAN_DIR --force"
            raise PlanError(f"{self.root / f.file} does not match the plan manifest (sha256 {got[:16]}..., "
                            f"expected {f.sha256[:16]}...); the plan is corrupt or was modified: {fix}")
        self._verified.add(f.file)


# ----------------------------------------------------------------------------------------------- loading

def load_plan(path: str | os.PathLike, verify: bool = False) -> Plan:
    """Read and check a plan directory; `verify=True` also checks every file's sha256 now (else lazily)."""
    root = Path(path)
    if not root.exists():
        raise PlanError(f"plan directory not found: {root}")
    if not root.is_dir():
        raise PlanError(f"{root} is not a plan directory (expected a directory made by cvqd-export)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise PlanError(f"{root} is not a cvqd plan: it has no {MANIFEST} (make one with cvqd-export --ckpt MODEL.pt "
                        f"--out {root})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read {mpath}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PlanError(f"{mpath} is not a cvqd plan manifest (not UTF-8 text); re-export the plan") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{mpath} is not a cvqd plan manifest (invalid JSON at line {exc.lineno}, column "
                        f"{exc.colno}); the file is damaged: re-export the plan") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PlanError(f"{mpath} is not a cvqd plan manifest (expected format {FORMAT!r}, found {found!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PlanError(f"{mpath}: invalid plan format version {version!r}")
    if version > VERSION:
        raise PlanError(f"{root} has plan format version {version}, newer than this cvqd reads ({VERSION}); "
                        f"upgrade cvqd or re-export the plan with this version")
    try:
        plan = _parse(root, manifest, version)
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise PlanError(f"{mpath}: malformed plan manifest ({what[:160]})") from None
    for f in plan.files():  # presence and size now; the sha256 when the file is used (or below)
        p = root / f.file
        if not p.is_file():
            raise PlanError(f"plan {root} is incomplete: {f.file} is missing; re-export it with cvqd-export --force")
        if p.stat().st_size != f.size:
            raise PlanError(f"plan {root}: {f.file} has {p.stat().st_size} bytes, the manifest says {f.size}; the "
                            f"file is truncated or was modified: re-export it with cvqd-export --force")
    if verify:
        plan.verify()
    return plan


def _parse(root: Path, m: dict[str, Any], version: int) -> Plan:
    config = ModelConfig.from_dict(m["config"])
    components: dict[str, ComponentEntry] = {}
    for name, c in m["components"].items():
        if name not in KNOWN:
            raise PlanError(f"{root / MANIFEST}: unknown component {name!r}; expected some of {list(KNOWN)}")
        components[name] = ComponentEntry(
            name=name, contract=Contract.from_dict(c["contract"]), onnx=_plan_file(root, c["onnx"]),
            external_data=tuple(_plan_file(root, x) for x in c.get("external_data", [])),
            opset=int(c["opset"]), cleanup=str(c.get("cleanup", "")), parity=dict(c.get("parity", {})))
    missing = [c for c in required_components(config) if c not in components]
    if missing:
        raise PlanError(f"plan {root} lacks components {missing}; re-export it with cvqd-export --force")
    engines = {}
    for name, e in (m.get("engines") or {}).items():
        engines[name] = EngineEntry(component=name, engine=_plan_file(root, e["engine"]),
                                    trt_version=str(e["trt_version"]),
                                    compute_capability=str(e["compute_capability"]), gpu_name=str(e["gpu_name"]),
                                    precision=str(e["precision"]), profile=dict(e["profile"]))
    null = m["null_embedding"]
    values = np.array([float(v) for v in null["values"]], dtype=np.float32)
    if values.shape != (config.clip.embed_dim,) or not np.isfinite(values).all():
        raise PlanError(f"{root / MANIFEST}: null embedding has {values.size} values (or non-finite ones), "
                        f"expected {config.clip.embed_dim} finite floats")
    tok = m["tokenizer"]
    precision = str(m["precision"])
    if precision not in ("fp32", "fp16"):
        raise PlanError(f"{root / MANIFEST}: unknown precision {precision!r}; expected fp32 or fp16")
    return Plan(root=root, version=version, config=config, precision=precision,
                contracts={k: v.contract for k, v in components.items()}, components=components,
                null_embedding=values,
                tokenizer=TokenizerSpec(str(tok["kind"]), str(tok["name"]), int(tok["context_length"]),
                                        _plan_file(root, tok["file"]) if tok.get("file") else None),
                engines=engines, versions=dict(m.get("versions", {})), exporter=dict(m.get("exporter", {})),
                source=dict(m.get("source", {})), created=str(m.get("created", "")), manifest=m)


def _plan_file(root: Path, d: dict[str, Any]) -> PlanFile:
    f = PlanFile.from_dict(d)
    # Manifest paths are plain names inside the plan directory: never absolute, never climbing out of it.
    if Path(f.file).is_absolute() or ".." in Path(f.file).parts or not f.file:
        raise PlanError(f"{root / MANIFEST}: file name {f.file!r} is not a name inside the plan directory")
    return f



# ------------------------------------------------------------------------------------ TensorRT engines

_LOGGER = None


def trt_logger(trt):
    """One process-wide TensorRT logger (runtimes keep a raw pointer to it, so it must never be collected)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def engine_mismatch(entry: EngineEntry, trt_version: str, compute_capability: str) -> str | None:
    """Why an engine cannot run with this TensorRT / GPU (None when it can). Engines need the exact version."""
    problems = []
    if entry.trt_version != trt_version:
        problems.append(f"TensorRT {entry.trt_version} (this machine has {trt_version})")
    if entry.compute_capability != compute_capability:
        problems.append(f"compute capability {entry.compute_capability} on {entry.gpu_name} "
                        f"(this GPU is {compute_capability})")
    return " and ".join(problems) or None


def current_trt_gpu() -> tuple[str, str, str]:
    """(TensorRT version, compute capability "M.m", GPU name) of this machine; PlanError naming what is missing."""
    try:
        import tensorrt as trt  # noqa: F401  (NVIDIA's wheel; not installable in every environment)
    except ImportError:
        raise PlanError("TensorRT is not installed (import tensorrt failed); install NVIDIA's tensorrt wheel, or "
                        "use another backend (onnxruntime, torch)") from None
    import torch

    if not torch.cuda.is_available():
        raise PlanError("no CUDA GPU is available, which TensorRT engines need; use another backend "
                        "(onnxruntime, torch)")
    major, minor = torch.cuda.get_device_capability()
    return str(trt.__version__), f"{major}.{minor}", torch.cuda.get_device_name()


def check_engines(plan: Plan, components: tuple[str, ...] | list[str] | None = None, *,
                  trt_version: str | None = None, compute_capability: str | None = None) -> None:
    """Raise a one-line PlanError unless every requested engine runs on this TensorRT and GPU.

    `trt_version`/`compute_capability` default to this machine's (which needs TensorRT and a GPU).
    """
    components = list(components or required_components(plan.config))
    if trt_version is None or compute_capability is None:
        v, cc, _ = current_trt_gpu()
        trt_version, compute_capability = trt_version or v, compute_capability or cc
    missing = [c for c in components if c not in plan.engines]
    if missing:
        raise PlanError(f"plan {plan.root} has no TensorRT engines for {missing}; build them with: "
                        f"cvqd-export --plan {plan.root} --trt")
    for c in components:
        why = engine_mismatch(plan.engines[c], trt_version, compute_capability)
        if why:
            raise PlanError(f"the TensorRT engine of {c!r} in {plan.root} was built for {why}; rebuild the "
                            f"engines on this machine with: {REBUILD_HINT.format(plan=plan.root)}")
