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


class GraphedARLoop:
    """An autoregressive `ARLoop` (cvqd/model/ar_loop.py) whose decode step is captured in a CUDA graph: the prefill
    and token 0 run eagerly, then one captured step (decode token n at the position held in device memory, write
    its KV slot into the static cache, draw token n+1 with its Philox noise, advance the position) is replayed N - 1
    times. Needs a backend whose ar_decode writes the cache in place (the torch backend's static cache). Same `run`
    signature as ARLoop; unverified on a GPU in this repository's tests (they skip without one)."""

    def __init__(self, loop, warmup: int = 2, max_graphs: int = 4):
        if not str(loop.device_name).startswith("cuda"):
            raise ValueError(f"CUDA graphs need a CUDA device, got {loop.device_name}")
        self.loop = loop
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[dict, torch.cuda.CUDAGraph]] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return torch.device(self.loop.device_name)

    @property
    def step_impl(self) -> str:
        return self.loop.step_impl + "+cuda-graph"

    def _draw(self, st: dict) -> None:
        from cvqd.model import step as stepmath
        from cvqd.model.ar_loop import sample_tokens

        B = st["tokens"].shape[0]
        logp = stepmath.guide_logits(st["logits"], B, st["guidance"], st["use_null"])
        noise = st["noise"].index_select(2, st["position"]).squeeze(2)  # [B, K]
        tok = sample_tokens(logp, noise, st["temperature"], st["top_k"], st["top_p"])
        st["tokens"].index_copy_(1, st["position"], tok[:, None])
        st["token"].copy_(tok)

    def _step(self, st: dict) -> None:
        feed = torch.cat([st["token"], st["token"]]) if st["use_null"] else st["token"]
        logits, cache = self.loop.decode(feed, st["position"], st["cache"])
        if cache.data_ptr() != st["cache"].data_ptr():
            st["cache"].copy_(cache)
        st["logits"].copy_(logits)
        st["position"].add_(1)
        self._draw(st)

    def _load(self, st: dict, cond: torch.Tensor, null: torch.Tensor, seeds: list[int]) -> None:
        rows = self.loop.rows(cond, null, st["use_null"])
        logits, cache = self.loop.prefill(rows)
        st["cache"].copy_(cache)
        st["logits"].copy_(logits)
        st["noise"].copy_(self.loop.noise(cond, seeds))
        st["position"].zero_()
        self._draw(st)

    def _capture(self, cond, null, seeds, key):
        B = cond.shape[0]
        _, guidance, temperature, top_k, top_p = key[:5]
        use_null = guidance != 1.0
        logits, cache = self.loop.prefill(self.loop.rows(cond, null, use_null))
        dev = self.device
        st = {"guidance": guidance, "temperature": temperature, "top_k": top_k, "top_p": top_p, "use_null": use_null,
              "logits": torch.empty_like(logits), "cache": torch.empty_like(cache),
              "noise": torch.empty(B, self.loop.num_classes, self.loop.seq_len, device=dev),
              "tokens": torch.zeros(B, self.loop.seq_len, dtype=torch.int64, device=dev),
              "token": torch.zeros(B, dtype=torch.int64, device=dev),
              "position": torch.zeros(1, dtype=torch.int64, device=dev)}
        self._load(st, cond, null, seeds)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(min(self.warmup, self.loop.seq_len - 2)):  # positions stay inside the sequence
                self._step(st)
        torch.cuda.current_stream(dev).wait_stream(side)
        self._load(st, cond, null, seeds)  # back to position 0 before the capture (which runs one step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(st)
        return st, graph

    @torch.no_grad()
    def run(self, cond: torch.Tensor, null: torch.Tensor, seeds: list[int], *, guidance: float, temperature: float,
            top_k: int, top_p: float, callback: Callback | None = None) -> torch.Tensor:
        cond = torch.as_tensor(cond).to(self.device, torch.float32)
        null = torch.as_tensor(null).to(self.device, torch.float32)
        key = (cond.shape[0], float(guidance), float(temperature), int(top_k), float(top_p), cond.shape[1])
        if key not in self._graphs:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = self._capture(cond, null, seeds, key)
        self._graphs.move_to_end(key)
        st, graph = self._graphs[key]
        self._load(st, cond, null, seeds)
        N = self.loop.seq_len
        if callback is not None:
            callback(1, N)
        for n in range(1, N):
            graph.replay()
            if callback is not None:
                callback(n + 1, N)
        return st["tokens"].clone()
