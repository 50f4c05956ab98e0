"""The TensorRT backend: runs a plan's TensorRT engines on torch's CUDA stream (written against TensorRT 10/11).

UNVERIFIED: TensorRT could not be installed where cvqd is developed, so this backend has never run. The code
follows the documented TensorRT 10 Python API (named I/O tensors; `set_input_shape`, `set_tensor_address`,
`execute_async_v3`), which TensorRT 11 keeps. Every status is checked and raises.

Each engine gets one execution context. Inputs are torch CUDA tensors bound by address; outputs are torch
buffers allocated once per input shape and reused, so a CUDA graph captured around `execute_async_v3` (on the
capture stream, which is torch's current stream during capture) keeps valid addresses at replay. The loop's
warm-up runs every engine once before capture, which TensorRT requires after a shape change.

Before anything loads, `check_engines` (cvqd/model/plan.py) compares each engine's TensorRT version and compute
capability with this machine's and says how to rebuild on a mismatch.
"""

from __future__ import annotations

import torch

from cvqd.errors import CvqdError
from cvqd.model.clip import clip_preprocess
from cvqd.runtime.backend import Backend
from cvqd.model.plan import Plan, check_engines, trt_logger
from cvqd.runtime.text import plan_tokenizer

_TORCH_DTYPES = {"int64": torch.int64, "float32": torch.float32}


class TrtComponent:
    """One TensorRT engine: call with torch CUDA tensors in contract order -> output tensors (reused buffers)."""

    def __init__(self, trt, runtime, plan: Plan, component: str, device: torch.device):
        self.runtime = runtime  # TensorRT keeps raw pointers to its runtime (and logger): they must outlive us
        self.component = component
        self.contract = plan.contracts[component]
        self.device = device
        data = plan.engine_path(component).read_bytes()  # sha256 checked by the plan
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise CvqdError(f"TensorRT could not deserialize the {component} engine of {plan.root}; rebuild the "
                            f"engines on this machine with: cvqd-export --plan {plan.root} --trt --force")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CvqdError(f"TensorRT could not create an execution context for {component} (out of GPU memory?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = {s.name for s in (*self.contract.inputs, *self.contract.outputs)}
        if names != expected:
            raise CvqdError(f"the {component} engine's tensors {sorted(names)} do not match the plan's contract "
                            f"{sorted(expected)}; rebuild with: cvqd-export --plan {plan.root} --trt --force")
        self._outputs: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        B = int(args[0].shape[0])
        if not self.contract.min_batch <= B <= self.contract.max_batch:
            raise CvqdError(f"{self.component}: batch of {B} rows is outside the engine's profile "
                            f"{self.contract.min_batch}..{self.contract.max_batch}; use a smaller batch_size")
        ctx = self.context
        for spec, a in zip(self.contract.inputs, args):
            assert a.is_cuda and a.is_contiguous() and a.dtype == _TORCH_DTYPES[spec.dtype], (spec, a.dtype)
            if not ctx.set_input_shape(spec.name, tuple(a.shape)):
                raise RuntimeError(f"TensorRT set_input_shape({spec.name}, {tuple(a.shape)}) failed")
            if not ctx.set_tensor_address(spec.name, a.data_ptr()):
                raise RuntimeError(f"TensorRT set_tensor_address({spec.name}) failed")
        key = tuple(tuple(a.shape) for a in args)
        outs = self._outputs.get(key)
        if outs is None:
            outs = [torch.empty(spec.concrete(B), dtype=_TORCH_DTYPES[spec.dtype], device=self.device)
                    for spec in self.contract.outputs]
            self._outputs[key] = outs
        for spec, o in zip(self.contract.outputs, outs):
            if not ctx.set_tensor_address(spec.name, o.data_ptr()):
                raise RuntimeError(f"TensorRT set_tensor_address({spec.name}) failed")
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.component}")
        return outs


def trt_backend(plan: Plan, device: str | torch.device = "cuda") -> Backend:
    """A Backend running the plan's TensorRT engines (the CLIP text/image encoders and the VQ decoder included)."""
    if plan.config.generator == "ar":
        raise CvqdError(f"plan {plan.root} is an autoregressive (CLIP-GEN) model: the tensorrt backend runs diffusion "
                        f"plans only; use --backend onnxruntime (CPU or CUDA) or torch")
    check_engines(plan, ("clip_text", "transformer", "vq_decoder"))  # PlanError: TRT/GPU missing or mismatched
    import tensorrt as trt

    dev = torch.device(device)
    if dev.type != "cuda":
        raise CvqdError("the tensorrt backend runs on a CUDA GPU; use device='cuda'")
    runtime = trt.Runtime(trt_logger(trt))
    with torch.cuda.device(dev):
        text = TrtComponent(trt, runtime, plan, "clip_text", dev)
        denoiser = TrtComponent(trt, runtime, plan, "transformer", dev)
        decoder = TrtComponent(trt, runtime, plan, "vq_decoder", dev)
    image: list[TrtComponent] = []
    cfg = plan.config
    tokenizer = plan_tokenizer(plan)  # numpy ids from the plan's BPE file

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        if not image:
            check_engines(plan, ("clip_image",))
            image.append(TrtComponent(trt, runtime, plan, "clip_image", dev))
        px = clip_preprocess(images, cfg.clip.image_size, cfg.clip.image_mean, cfg.clip.image_std).contiguous()
        return image[0](px)[0].clone()

    max_images = min(text.contract.max_batch, decoder.contract.max_batch, denoiser.contract.max_batch // 2)
    return Backend(
        name="tensorrt", device=dev,
        tokenize=lambda prompts: torch.from_numpy(tokenizer(prompts)).to(dev),
        encode_text=lambda ids: text(ids.contiguous())[0].clone(),
        # the logits buffer is reused by the next call: the sampling step consumes it before then
        denoise=lambda tokens, t, cond: denoiser(tokens.contiguous(), t.contiguous(), cond.contiguous())[0],
        decode=lambda tokens: decoder(tokens.contiguous())[0].clone(),
        encode_image=encode_image, overflow=tokenizer.overflow, max_batch=max_images, capturable=True,
        precision=plan.precision,
        info={"plan": str(plan.root), "device": str(dev), "tensorrt": str(trt.__version__),
              "precision": plan.precision})
