"""One component -> one ONNX graph file: torch.onnx (dynamo) export, clean-up, save, onnx.checker.

Exporter: `torch.onnx.export(..., dynamo=True, opset_version=18)` (the comparison is in docs/export.md,
"Exporter choice"; benchmarks/export_exporters.py runs it). On these export modules both exporters give graphs
of the same size after onnxslim, the same parity and the same ONNX Runtime latency; the TorchScript exporter
(dynamo=False) only exports faster. dynamo is used because the TorchScript exporter is deprecated (it warns on
every call) and its tracer records one Python execution and only warns where the trace may not generalise (as
on the q/k/v unpacking of the attention), while torch.export traces the batch dimension symbolically and fails
loudly when a graph would not hold for every batch size. Opset 18 because the dynamo
exporter's opset-17 graphs are rejected by ONNX Runtime (Split num_outputs).

Clean-up: onnxslim (constant folding, shape inference, dead-node elimination) for graphs up to
SLIM_MAX_BYTES of weights. onnxslim holds several copies of the weights in memory (many GB for the 2 GB paper
transformer), so larger graphs keep the exporter's own optimisation (constant folding and
dead-code removal by onnxscript's optimizer, run by torch.onnx) and get onnx's shape inference on disk.

Storage: graphs under 1.5 GiB are one self-contained .onnx file; larger ones keep their tensors in one
external data file `<component>.onnx.data` next to the graph (protobuf cannot hold 2 GB).
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import cvqd
from cvqd.errors import CvqdError
from cvqd.model.contracts import BATCH, Contract

OPSET = 18
SLIM_MAX_BYTES = 512 << 20  # onnxslim's peak memory is several times the weights (docs/export.md)
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB: above this the tensors go to <component>.onnx.data
EXPORT_SAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1; 2 keeps the batch symbolic
EXPORTER = {
    "name": "torch.onnx.export(dynamo=True)",
    "opset": OPSET,
    "why": "same graph size after onnxslim, parity and ONNX Runtime latency as the TorchScript exporter "
           "(benchmarks/export_exporters.py), which is deprecated and traces one Python execution; torch.export "
           "traces the batch dimension symbolically and fails loudly instead; opset 18 because opset-17 dynamo "
           "graphs were rejected by ONNX Runtime (Split num_outputs). Cost: slower export (seconds per graph)",
}


class ExportError(CvqdError):
    """A component that could not be exported (an unsupported model or operator)."""


@dataclass
class ExportedGraph:
    component: str
    path: Path  # the .onnx file
    files: list[Path]  # the .onnx file and its external data files, if any
    opset: int
    cleanup: str
    weight_bytes: int
    seconds: float


def export_graph(component: str, graph: torch.nn.Module, contract: Contract, inputs: dict[str, torch.Tensor],
                 out_dir: Path, precision: str) -> ExportedGraph:
    """Export `graph` (from graphs.build_graph) to `out_dir/<component>.onnx` with a dynamic batch dimension.

    `inputs` are example inputs at EXPORT_SAMPLE_BATCH rows, keyed like the contract's inputs.
    """
    import onnx

    t0 = time.perf_counter()
    names = [s.name for s in contract.inputs]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = {s.name: ({0: batch} if s.shape and s.shape[0] == BATCH else None) for s in contract.inputs}
    args = tuple(inputs[n] for n in names)
    sink = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")  # exporter chatter (deprecations, axis renames) is not for users
            program = torch.onnx.export(graph, args, None, dynamo=True, opset_version=OPSET, input_names=names,
                                        output_names=[s.name for s in contract.outputs], dynamic_shapes=dynamic,
                                        optimize=True, verbose=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"could not export {component}: {type(exc).__name__}: {first[:200]}") from None
    model = program.model_proto
    del program  # the exporter's IR holds another reference to every weight
    weight_bytes = sum(_tensor_bytes(t) for t in model.graph.initializer)

    if weight_bytes <= SLIM_MAX_BYTES:
        import onnxslim

        with contextlib.redirect_stdout(sink):
            model = onnxslim.slim(model)
        cleanup = f"onnxslim {onnxslim.__version__} (constant folding, shape inference, dead nodes)"
    else:
        cleanup = "exporter optimizer (constant folding, dead code) + onnx shape inference (graph too large for onnxslim)"
    _name_batch_dims(model, contract)
    model.producer_name, model.producer_version = "cvqd", cvqd.__version__
    model.doc_string = f"cvqd {component} ({precision}); I/O contract in the plan's manifest.json"
    for key, value in {"cvqd.component": component, "cvqd.precision": precision}.items():
        model.metadata_props.add(key=key, value=value)

    path = out_dir / f"{component}.onnx"
    files = [path]
    if weight_bytes > EXTERNAL_DATA_BYTES:
        data = f"{component}.onnx.data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=1024)
        files.append(out_dir / data)
    else:
        onnx.save_model(model, str(path))
    del model
    if weight_bytes > SLIM_MAX_BYTES:  # on the file: never serialises the weights into one protobuf
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    return ExportedGraph(component, path, files, OPSET, cleanup, weight_bytes, time.perf_counter() - t0)


def _tensor_bytes(t) -> int:
    import onnx

    n = 1
    for d in t.dims:
        n *= d
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _name_batch_dims(model, contract: Contract) -> None:
    """Check graph I/O names, dtypes and ranks against the contract; name the dynamic dimension "batch"."""
    import onnx

    specs = {s.name: s for s in (*contract.inputs, *contract.outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name not in specs:
            raise ExportError(f"{contract.component}: graph tensor {vi.name!r} is not in the I/O contract")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        if dtype != specs[vi.name].dtype:
            raise ExportError(f"{contract.component}: {vi.name} is {dtype}, the contract says {specs[vi.name].dtype}")
        dims = vi.type.tensor_type.shape.dim
        want = specs[vi.name].shape
        if len(dims) != len(want):
            raise ExportError(f"{contract.component}: {vi.name} has rank {len(dims)}, the contract says {len(want)}")
        for d, w in zip(dims, want):
            if isinstance(w, str):
                d.ClearField("dim_value")
                d.dim_param = w
            elif d.HasField("dim_value") and d.dim_value != w:
                raise ExportError(f"{contract.component}: {vi.name} has shape {[x.dim_value for x in dims]}, "
                                  f"the contract says {list(want)}")
            else:
                d.dim_value = int(w)
