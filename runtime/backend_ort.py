"""The ONNX Runtime backend: runs a plan's ONNX graphs (CPU execution provider by default).

CPU: the backend's arrays are numpy arrays, handed to ONNX Runtime as they are; nothing imports torch (the
tokenizer is the plan's BPE file, the CLIP image preprocessing is numpy). CUDA: with onnxruntime-gpu and a GPU,
the CUDA execution provider runs the graphs with IOBinding on torch's CUDA tensors (inputs bound in place,
outputs written into preallocated torch buffers), so the sampling kernels read the logits where ONNX Runtime wrote
them. onnxruntime-gpu without a usable GPU silently falls back to the CPU provider: the backend checks which
provider each session really got and says so.

The clip_image session (best-of-N reranking) is created on first use. Nothing here imports cvqd.training.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from cvqd.errors import CvqdError
from cvqd.model.arrays import is_torch
from cvqd.model.plan import Plan
from cvqd.runtime.backend import Backend, is_cuda, ort_cuda_usable
from cvqd.runtime.text import plan_tokenizer

_NP = {"int64": np.int64, "float32": np.float32}


class OrtComponent:
    """One ONNX graph in an InferenceSession; call with arrays in contract order -> outputs of the same kind
    (numpy on the CPU, torch CUDA tensors with the CUDA provider)."""

    def __init__(self, plan: Plan, component: str, device: str, threads: int | None = None,
                 reuse_outputs: bool = False):
        import onnxruntime as ort

        # CUDA: reuse_outputs binds the same output buffers on every call of a batch size (no allocation per step;
        # the denoiser's logits are consumed before the next step). Otherwise each call returns fresh tensors that
        # the caller may keep (text embeddings, images).
        self.reuse_outputs = reuse_outputs

        self.component = component
        self.contract = plan.contracts[component]
        self.device = device
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: no warnings about unused initializers on stderr
        if os.environ.get("CVQD_ORT_SPIN", "0") != "1":
            # ORT's pool threads spin-wait after each run by default, holding the cores the torch sampling step
            # needs right after it, which slows that step down whenever the cores are few
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        if is_cuda(device):
            providers = [("CUDAExecutionProvider", {"device_id": _index(device)}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        path = plan.onnx_path(component)  # sha256 checked here (PlanError if the file was modified)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception:  # ORT raises its own exception types for graphs it cannot run
            entry = plan.components[component]
            raise CvqdError(f"ONNX Runtime {ort.__version__} cannot load the {component} graph {path} (ONNX opset "
                            f"{entry.opset}, exported by cvqd-export with onnx {plan.versions.get('onnx', '?')}); "
                            f"upgrade onnxruntime, or re-export the plan with this installation") from None
        self.provider = self.session.get_providers()[0]
        self.inputs = [i.name for i in self.contract.inputs]
        self.outputs = [o.name for o in self.contract.outputs]
        self._out_buffers: dict[tuple, list] = {}

    def __call__(self, *args) -> list:
        B = args[0].shape[0]
        if self.contract.max_batch and B > self.contract.max_batch:
            raise CvqdError(f"{self.component}: batch of {B} rows exceeds the plan's maximum "
                            f"{self.contract.max_batch}; use a smaller batch size (or re-export with more)")
        if self.provider == "CUDAExecutionProvider":
            return self._run_bound(args)
        torch_in = is_torch(args[0])
        feeds = {n: _host(a, spec.dtype) for n, a, spec in zip(self.inputs, args, self.contract.inputs)}
        outs = self.session.run(self.outputs, feeds)
        if torch_in:  # callers that work in torch (CUDA requested but the CPU provider was given) get tensors
            import torch

            return [torch.from_numpy(o).to(self.device) for o in outs]
        return outs

    def _run_bound(self, args) -> list:
        import torch

        args = [torch.as_tensor(a).to(self.device, getattr(torch, spec.dtype))
                for a, spec in zip(args, self.contract.inputs)]
        binding = self.session.io_binding()
        args = [a.detach().contiguous() for a in args]
        for spec, a in zip(self.contract.inputs, args):
            binding.bind_input(spec.name, "cuda", _index(self.device), _NP[spec.dtype], list(a.shape), a.data_ptr())
        B = args[0].shape[0]
        outs = self._out_buffers.get((B,)) if self.reuse_outputs else None
        if outs is None:
            outs = [torch.empty(spec.concrete(B), dtype=getattr(torch, spec.dtype), device=self.device)
                    for spec in self.contract.outputs]
            if self.reuse_outputs:
                self._out_buffers[(B,)] = outs
        for spec, o in zip(self.contract.outputs, outs):
            binding.bind_output(spec.name, "cuda", _index(self.device), _NP[spec.dtype], list(o.shape), o.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch's stream are complete
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outs


def _index(device) -> int:
    text = str(device)
    return int(text.split(":")[1]) if ":" in text else 0


def _host(a, dtype: str) -> np.ndarray:
    """An input as a contiguous numpy array of the contract's dtype (a no-op for the loop's own arrays)."""
    if is_torch(a):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(a, dtype=_NP[dtype])


def ort_backend(plan: Plan, device: str = "cpu", threads: int | None = None, warn=None) -> Backend:
    """A Backend running `plan` on ONNX Runtime; device "cpu" or "cuda" (needs onnxruntime-gpu and a GPU)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise CvqdError("onnxruntime is not installed; pip install onnxruntime (or use backend='torch')") from None
    dev = str(device)
    if is_cuda(dev) and not ort_cuda_usable():
        raise CvqdError("the onnxruntime backend on cuda needs onnxruntime-gpu (CUDAExecutionProvider) and a visible "
                        "GPU; use device='cpu', or backend='torch' / 'tensorrt' on the GPU")
    threads = threads or int(os.environ.get("CVQD_ORT_THREADS", "0")) or None
    cfg = plan.config
    text = OrtComponent(plan, "clip_text", dev, threads)
    ar = cfg.generator == "ar"
    if ar:  # the decode step's cache output is the next step's input: never a reused buffer
        prefill = OrtComponent(plan, "ar_prefill", dev, threads)
        step = OrtComponent(plan, "ar_decode", dev, threads)
        denoiser = step
    else:
        denoiser = OrtComponent(plan, "transformer", dev, threads, reuse_outputs=True)
    decoder = OrtComponent(plan, "vq_decoder", dev, threads)
    sessions = (text, denoiser, decoder, prefill) if ar else (text, denoiser, decoder)
    if is_cuda(dev) and any(c.provider != "CUDAExecutionProvider" for c in sessions):
        (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(
            "ONNX Runtime fell back to the CPU execution provider although CUDA was requested")
    tokenizer = plan_tokenizer(plan)
    image_encoder: list[OrtComponent] = []

    def encode_image(images):
        if not image_encoder:
            image_encoder.append(OrtComponent(plan, "clip_image", dev, threads))
        if is_torch(images):  # CUDA: the torch preprocessing on the device
            from cvqd.model.clip import clip_preprocess
        else:
            from cvqd.model.pixels import clip_preprocess
        px = clip_preprocess(images, cfg.clip.image_size, cfg.clip.image_mean, cfg.clip.image_std)
        return image_encoder[0](px)[0]

    vq_encoder: list[OrtComponent] = []

    def encode_tokens(images):
        if not vq_encoder:
            vq_encoder.append(OrtComponent(plan, "vq_encoder", dev, threads))
        return vq_encoder[0](images)[0]

    def tokenize(prompts: list[str]):
        ids = tokenizer(prompts)
        if not is_cuda(dev):
            return ids
        import torch

        return torch.from_numpy(ids).to(dev)

    max_images = min(text.contract.max_batch, decoder.contract.max_batch, denoiser.contract.max_batch // 2)
    return Backend(
        name="onnxruntime", device=dev,
        tokenize=tokenize,
        encode_text=lambda ids: text(ids)[0],
        denoise=None if ar else (lambda tokens, t, cond: denoiser(tokens, t, cond)[0]),
        ar_prefill=(lambda cond: tuple(prefill(cond))) if ar else None,
        ar_decode=(lambda token, position, past: tuple(step(token, position, past))) if ar else None,
        decode=lambda tokens: decoder(tokens)[0],
        encode_image=encode_image, overflow=tokenizer.overflow, max_batch=max_images, capturable=False,
        encode_tokens=encode_tokens if "vq_encoder" in plan.components else None,
        precision=plan.precision,
        info={"plan": str(plan.root), "execution_provider": denoiser.provider, "device": str(dev),
              "precision": plan.precision})
