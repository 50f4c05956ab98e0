"""Whole-step CUDA graph capture of the reverse loop: capture one step, replay it S times (GPU only).

Every per-step value of `ReverseLoop.device_step` lives in device memory at a fixed address (the step index,
the (t, s) table, the Philox keys, the token buffer), so a single captured step serves all S steps: each replay
reads the step index, runs the denoiser and the fused sampling kernels, and increments the index on the
device. There is no host sync between steps; the host only enqueues S graph launches.

Per loop shape (batch, steps, guidance, truncation, condition width) the graph and its static buffers are built
once: warm-up on a side stream (allocator, cuBLAS/cuDNN handles, kernel module load, TensorRT's deferred
allocations), capture on torch's graph stream, replay. Autocast must run with cache_enabled=False inside a
capture (the torch backend does so). Eager and replayed runs give identical tokens (tests/test_runtime_gpu.py).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from cvqd.model.loop import Callback, LoopState, ReverseLoop


class GraphedLoop:
    """A `ReverseLoop` whose step is captured in a CUDA graph and replayed; same `run` signature."""

    def __init__(self, loop: ReverseLoop, warmup: int = 2, max_graphs: int = 4):
        if loop.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {loop.device}")
        self.loop = loop
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[LoopState, torch.cuda.CUDAGraph]] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.loop.device

    @property
    def step_impl(self) -> str:
        return self.loop.step_impl + "+cuda-graph"

    def _capture(self, batch: int, steps: int, guidance: float, truncation: float, dim: int, start_t=None):
        loop = self.loop
        state = loop.new_state(batch, steps, guidance, truncation, dim, start_t)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                state.step.zero_()  # stay inside the step table whatever `steps` is
                loop.device_step(state)
            state.step.zero_()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop.device_step(state)
        return state, graph

    @torch.no_grad()
    def run(self, cond: torch.Tensor, null: torch.Tensor, seeds: list[int], *, steps: int, guidance: float,
            truncation: float, callback: Callback | None = None, fixed=None, renoise=None) -> torch.Tensor:
        key = (cond.shape[0], steps, float(guidance), float(truncation), cond.shape[1],
               None if renoise is None else int(renoise[1]))
        if key not in self._graphs:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = self._capture(*key)
        self._graphs.move_to_end(key)
        state, graph = self._graphs[key]
        self.loop.load(state, torch.as_tensor(cond).to(self.device, torch.float32),
                       torch.as_tensor(null).to(self.device, torch.float32), seeds, fixed, renoise)
        S = state.table.num_steps
        for i in range(S):
            graph.replay()
            if callback is not None:
                callback(i + 1, S)
        return state.x.clone()
