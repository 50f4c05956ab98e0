"""TensorRT engines from a plan's ONNX graphs (TensorRT 10 and 11 Python API). UNVERIFIED: never run.

TensorRT could not be installed where cvqd is developed, so this file follows NVIDIA's documented API and has
never run against a real TensorRT. Everything around it that can run without TensorRT is tested:
profile shapes from the I/O contracts, engine file names, the manifest entries, the error when TensorRT or
a GPU is missing.

    cvqd-export --ckpt model.pt --trt          # export the ONNX plan, then build one engine per component
    cvqd-export --plan model.plan --trt        # add engines to an existing plan (--force rebuilds them)

Build settings:
- strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED: required to opt in on 10.x,
  always on in 11.x): precision comes from the graph, so FP16 engines are built from fp16 plans' graphs;
  no BuilderFlag.FP16/BF16/INT8 (removed in 11.x). fp32 graphs keep TensorRT's default TF32 for matmuls and
  convolutions, which is why engines are checked against the fp16 tolerances.
- one optimization profile per engine: min/opt/max batch from the component's I/O contract;
- a timing cache file reused across builds (per TensorRT version and GPU architecture);
- a workspace memory-pool limit and the builder optimisation level (0-5, default 3).
Engine files are named `<component>.<precision>.trt<version>.sm<cc>.engine` and recorded in the manifest with
the TensorRT version, compute capability and GPU name; `cvqd.model.plan.check_engines` refuses a mismatch.
After the build each engine is run once on the GPU and compared with ONNX Runtime (CPU) on the same graph.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvqd.errors import CvqdError
from cvqd.io import atomic_write_bytes
from cvqd.export.validate import TOLERANCES, compare, judge_parity, ort_session, sample_inputs
from cvqd.model.contracts import COMPONENTS, Contract
from cvqd.model.plan import trt_logger
from cvqd.paths import cache_root


@dataclass
class TrtOptions:
    workspace_gib: float = 8.0
    opt_level: int = 3  # builder optimisation level 0..5 (TensorRT's default is 3)
    timing_cache: Path | None = None  # default: default_timing_cache(version, cc)

    def __post_init__(self) -> None:
        if not 0 < self.workspace_gib <= 1024:
            raise CvqdError(f"workspace must be in (0, 1024] GiB, got {self.workspace_gib}")
        if self.opt_level not in range(6):
            raise CvqdError(f"builder optimisation level must be 0..5, got {self.opt_level}")


@dataclass
class TrtEnv:
    trt: Any  # the tensorrt module
    version: str
    compute_capability: str  # "9.0"
    gpu_name: str


def require_trt() -> TrtEnv:
    """TensorRT and a CUDA GPU, or one CvqdError line naming what is missing."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError as exc:
        trt = None
        missing.append(f"TensorRT (import tensorrt failed: {exc}; install NVIDIA's tensorrt wheel, 10.x or 11.x)")
    if not torch.cuda.is_available():
        missing.append("an NVIDIA GPU with a working CUDA driver (torch.cuda.is_available() is False)")
    if missing:
        raise CvqdError("--trt needs " + " and ".join(missing) + "; the ONNX plan runs without them")
    major, minor = torch.cuda.get_device_capability()
    return TrtEnv(trt, str(trt.__version__), f"{major}.{minor}", torch.cuda.get_device_name())


def engine_file_name(component: str, precision: str, trt_version: str, compute_capability: str) -> str:
    """e.g. transformer.fp16.trt10.8.0.43.sm90.engine: engines only run on the TensorRT + GPU they were built for."""
    return f"{component}.{precision}.trt{trt_version}.sm{compute_capability.replace('.', '')}.engine"


def default_timing_cache(trt_version: str, compute_capability: str) -> Path:
    return cache_root() / "trt" / f"timing-trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def profile_shapes(contract: Contract) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input of a contract: the batch dimension from its min/opt/max batch."""
    return {s.name: (s.concrete(contract.min_batch), s.concrete(contract.opt_batch), s.concrete(contract.max_batch))
            for s in contract.inputs}


def build_engine(env: TrtEnv, onnx_path: Path, contract: Contract, options: TrtOptions) -> tuple[bytes, dict[str, Any]]:
    """Parse one ONNX graph (external data next to it) and build a serialized engine; the timing cache is updated.

    -> (engine bytes, the builder settings read back from the network and config after the build: what was
    really set, for the manifest).
    """
    trt = env.trt
    builder = trt.Builder(trt_logger(trt))
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # opt-in on 10.x, the only mode on 11.x
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CvqdError(f"TensorRT could not parse {onnx_path.name}: {errors[:300]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    config.builder_optimization_level = options.opt_level
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(contract).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = options.timing_cache or default_timing_cache(env.version, env.compute_capability)
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is not used

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CvqdError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), builder_settings(trt, network, config)


def builder_settings(trt, network, config) -> dict[str, Any]:
    """The flags and limits a build used, read back from TensorRT (not from our options)."""
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = sorted(name for name, flag in trt.BuilderFlag.__members__.items() if config.get_flag(flag))
    return {"strongly_typed": bool(strongly_typed is not None and network.get_flag(strongly_typed)),
            "builder_flags": flags,
            "workspace_bytes": int(config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)),
            "opt_level": int(config.builder_optimization_level)}


def run_engine(env: TrtEnv, engine_bytes: bytes, contract: Contract,
               inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Run a serialized engine once on the GPU (torch-owned buffers, execute_async_v3); -> the first output."""
    trt = env.trt
    runtime = trt.Runtime(trt_logger(trt))  # kept alive while its engine is used
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise CvqdError("TensorRT could not deserialize the engine it just built")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want = [s.name for s in (*contract.inputs, *contract.outputs)]
    if sorted(names) != sorted(want):
        raise CvqdError(f"{contract.component}: engine I/O {names} differs from the contract's {want}")
    ctx = engine.create_execution_context()
    buffers: dict[str, torch.Tensor] = {}
    for spec in contract.inputs:
        t = torch.from_numpy(inputs[spec.name]).cuda().contiguous()
        buffers[spec.name] = t
        ctx.set_input_shape(spec.name, tuple(t.shape))
        ctx.set_tensor_address(spec.name, t.data_ptr())
    for spec in contract.outputs:
        out = torch.empty(tuple(ctx.get_tensor_shape(spec.name)), dtype=torch.float32, device="cuda")
        buffers[spec.name] = out
        ctx.set_tensor_address(spec.name, out.data_ptr())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the input copies above ran on the current stream
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise CvqdError(f"{contract.component}: TensorRT execution failed")
    stream.synchronize()
    return buffers[contract.outputs[0].name].cpu().numpy()


def engine_parity(env: TrtEnv, engine_bytes: bytes, onnx_path: Path, contract: Contract, cfg) -> dict[str, Any]:
    """The engine against ONNX Runtime (CPU) on the same graph and random inputs, at min and max batch."""
    sess = ort_session(onnx_path)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in sorted({contract.min_batch, contract.max_batch}):
        inputs = {k: v.numpy() for k, v in sample_inputs(contract, cfg, b, gen).items()}
        ref = sess.run(None, inputs)[0]
        rows.append({"batch": b, **compare(contract.component, run_engine(env, engine_bytes, contract, inputs), ref)})
    # TF32/fp16 arithmetic on the GPU against fp32 on the CPU
    return judge_parity(rows, TOLERANCES["fp16"], "onnxruntime CPU, same ONNX graph")


def build_engines(root: Path, manifest: dict[str, Any], env: TrtEnv, options: TrtOptions | None = None,
                  components: tuple[str, ...] = COMPONENTS, progress: bool = False) -> dict[str, Any]:
    """Build the engines of a plan being assembled in `root` (its ONNX files and manifest dict); -> "engines"."""
    from cvqd.model.config import ModelConfig
    from cvqd.export.plan_writer import describe_file, progress_bar

    options = options or TrtOptions()
    cfg = ModelConfig.from_dict(manifest["config"])
    precision = manifest["precision"]
    engines: dict[str, Any] = {}
    bar = progress_bar(progress, total=len(components))
    for name in components:
        entry = manifest["components"][name]
        contract = Contract.from_dict(entry["contract"])
        bar.set_description(f"TensorRT build {name}")
        t0 = time.perf_counter()
        blob, settings = build_engine(env, root / entry["onnx"]["file"], contract, options)
        seconds = time.perf_counter() - t0
        parity = engine_parity(env, blob, root / entry["onnx"]["file"], contract, cfg)
        if not parity["passed"]:
            raise CvqdError(f"TensorRT engine of {name} disagrees with ONNX Runtime: {'; '.join(parity['failures'])}")
        path = root / engine_file_name(name, precision, env.version, env.compute_capability)
        path.write_bytes(blob)
        engines[name] = {
            "engine": describe_file(root, path), "trt_version": env.version,
            "compute_capability": env.compute_capability, "gpu_name": env.gpu_name, "precision": precision,
            "profile": {"min": contract.min_batch, "opt": contract.opt_batch, "max": contract.max_batch},
            "builder": {**settings, "seconds": round(seconds, 2)},
            "parity": parity,
        }
        bar.update(1)
    bar.close()
    return engines


def add_engines(plan_dir: str | os.PathLike, *, force: bool = False, options: TrtOptions | None = None,
                progress: bool = False):
    """`cvqd-export --plan DIR --trt`: build engines for an existing plan, atomically; -> the reloaded Plan.

    The new plan is assembled next to the old one (its files hard-linked, they are never modified in place) and
    swapped in when complete. Existing engines are replaced only with `force`.
    """
    from cvqd.export.plan_writer import staging_dir, write_manifest
    from cvqd.model.plan import load_plan

    plan = load_plan(plan_dir, verify=True)
    refuse_ar(plan.config.generator, plan.root)
    env = require_trt()  # before any work: a one-line error when TensorRT or the GPU is missing
    if plan.engines and not force:
        built = sorted({f"TensorRT {e.trt_version} on {e.sm}" for e in plan.engines.values()})
        raise CvqdError(f"plan {plan.root} already has TensorRT engines ({', '.join(built)}); pass --force to "
                        f"rebuild them")
    manifest = dict(plan.manifest)
    with staging_dir(plan.root) as tmp:
        for f in (f for c in plan.components.values() for f in c.files):
            link_or_copy(plan.root / f.file, tmp / f.file)
        manifest["engines"] = build_engines(tmp, manifest, env, options, progress=progress)
        manifest["versions"] = {**manifest.get("versions", {}), "tensorrt": env.version}
        write_manifest(tmp, manifest)
    return load_plan(plan.root)


def refuse_ar(generator: str, what) -> None:
    """TensorRT engines exist for diffusion plans only: the autoregressive decode step (KV cache) has no engine
    builder or runtime here."""
    if generator == "ar":
        raise CvqdError(f"{what} is an autoregressive (CLIP-GEN) model: TensorRT engines are built for diffusion "
                        f"plans only; run it on onnxruntime (CPU or CUDA) or the torch backend")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (plan files are immutable once written), or copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
