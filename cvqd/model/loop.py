"""The reverse-diffusion loop, written once against a small denoiser interface.

    all-[MASK] x [B, N] -> for each (t, s) step: denoiser logits on R rows [conditional; null]
    -> guidance -> truncation -> posterior -> Gumbel-max (Philox noise keyed by each image's seed) -> x_0 tokens

A caller only supplies a `Denoise` (cvqd/model/contracts.py): tokens [R, N] int64, t [R] int64, cond [R, D]
float32 -> logits [R, K, N] float32, unnormalised (the transformer graph's contract; `DiffusionTransformer.logits`
in training). The runtime's backends, training's sample grids and `cvqd-eval` all sample through this loop.

Two ways through it, the same step math (cvqd/model/step.py) and the same Philox noise:
- host (the CPU without kernels): the step runs on numpy arrays, the noise is generated in numpy in chunks of
  steps. The denoiser gets arrays of the kind the caller passed (`cond` a numpy array: numpy, no torch anywhere;
  a torch tensor: CPU tensors sharing the numpy buffers) and the tokens come back as that kind.
- device (a GPU, or any device with kernels): every per-step value lives in device memory (the step index, the
  (t, s) table, the Philox keys), so the step can be captured once in a CUDA graph and replayed
  (runtime/cuda_graph.py) with no host sync between steps; `LoopState` holds those static buffers. The step is
  the torch form of the same math, or the fused CUDA kernels (kernels/sampling.cu) passed in by the runtime.
So a seed gives the same tokens on every backend up to the denoiser's own numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cvqd.model import step as stepmath
from cvqd.model.arrays import is_torch, to_numpy
from cvqd.model.contracts import Denoise
from cvqd.model.rng import GumbelSource, gumbel_noise, renoise_uniforms, seed_key_array
from cvqd.model.schedule import MaskReplaceSchedule

Callback = Callable[[int, int], None]


@dataclass
class LoopState:
    """Static buffers of one loop shape (batch B, steps S, guided or not), all torch tensors on the loop's device."""

    table: stepmath.StepTable  # t [S], terms [S, 9]
    keys: Any  # [B, 2] int64 Philox keys (the images' seeds)
    rows: Any  # [R, D] conditions: [cond; null] with guidance, cond without
    x: Any  # [B, N] int64 current tokens
    x0: Any  # [B, N] int64 tokens held fixed where `keep` (editing: the input image's tokens)
    keep: Any  # [B, N] bool: positions held at x0 at every step (all False: plain sampling)
    step: Any  # [1] int64 step index (read by the kernels and the graph)
    guidance: float
    truncation: float

    @property
    def use_null(self) -> bool:
        return self.rows.shape[0] == 2 * self.x.shape[0]

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


class ReverseLoop:
    """Samples x_0 tokens for conditions with a denoiser; `kernels` switches the device step to the fused CUDA
    kernels. `device`: where the denoiser's tensors live ("cpu", "cuda:0", a torch.device)."""

    def __init__(self, denoise: Denoise, schedule: MaskReplaceSchedule, seq_len: int, device="cpu", kernels=None):
        self.denoise = denoise
        self.schedule = schedule
        self.seq_len = seq_len
        self.num_classes = schedule.num_classes
        self.device_name = str(device)
        self.kernels = kernels  # cvqd.kernels.sampling.SamplingKernels or None

    @property
    def on_host(self) -> bool:
        return self.kernels is None and self.device_name == "cpu"

    @property
    def device(self):
        """The torch device (imports torch; the host path never asks)."""
        import torch

        return torch.device(self.device_name)

    @property
    def step_impl(self) -> str:
        return "cuda-kernels" if self.kernels is not None else ("numpy" if self.on_host else "torch")

    # ----------------------------------------------------------------------------------------- run

    def run(self, cond, null, seeds: list[int], *, steps: int, guidance: float, truncation: float,
            callback: Callback | None = None, fixed=None, renoise=None):
        """x_0 tokens [B, N] for conditions cond [B, D] (normalised) and the null condition null [D].

        Row b's noise comes from Philox keyed by seeds[b], so its tokens do not depend on the batch it is in.
        The tokens come back as the kind of array `cond` is (numpy array or torch tensor).
        `fixed`: (x0 [B, N] int64, keep [B, N] bool) numpy arrays: positions where keep is True start at x0 and are
        set back to x0 after every step (token-space editing: only the other positions are generated).
        `renoise`: (x0 [B, N] int64 numpy, start_t): a global edit. The loop starts from x_t ~ q(x_t | x0) at the
        first strided timestep <= start_t (drawn from each image's Philox key, stream STREAM_RENOISE) and runs
        only the steps from there.
        """
        if self.on_host:
            return self._run_host(cond, null, seeds, steps, guidance, truncation, callback, fixed, renoise)
        return self._run_device(cond, null, seeds, steps, guidance, truncation, callback, fixed, renoise)

    def initial_tokens(self, seeds: list[int], table: stepmath.StepTable, renoise) -> np.ndarray:
        """x at the loop's first step: all [MASK], or the re-noised x0 of a global edit: [B, N] int64 numpy."""
        B, K = len(seeds), self.num_classes
        if renoise is None:
            return np.full((B, self.seq_len), K, dtype=np.int64)
        x0 = np.asarray(renoise[0], dtype=np.int64)
        t0 = int(np.asarray(table.t if not hasattr(table.t, "cpu") else table.t.cpu())[0])
        return self.schedule.q_sample_host(x0, t0, renoise_uniforms(seed_key_array(seeds), self.seq_len))

    def _run_host(self, cond, null, seeds, steps, guidance, truncation, callback, fixed=None, renoise=None):
        if is_torch(cond):  # a torch denoiser: never build autograd graphs here
            import torch

            with torch.no_grad():
                return self._host_loop(cond, null, seeds, steps, guidance, truncation, callback, fixed, renoise)
        return self._host_loop(cond, null, seeds, steps, guidance, truncation, callback, fixed, renoise)

    def _host_loop(self, cond, null, seeds, steps, guidance, truncation, callback, fixed, renoise):
        K, N, B = self.num_classes, self.seq_len, len(seeds)
        as_torch = is_torch(cond)
        if as_torch:  # the denoiser takes CPU tensors: views of the numpy buffers, no copies
            import torch

            wrap = torch.from_numpy
        else:
            wrap = lambda a: a  # noqa: E731
        cond = to_numpy(cond).astype(np.float32, copy=False)
        assert cond.shape[0] == B, (cond.shape, B)
        use_null = guidance != 1.0  # without guidance the null rows cannot change the result: skip them
        if use_null:
            null = np.broadcast_to(to_numpy(null).astype(np.float32, copy=False).reshape(1, -1), cond.shape)
            rows = np.ascontiguousarray(np.concatenate([cond, null]))
        else:
            rows = np.ascontiguousarray(cond)
        table = stepmath.build_step_table(self.schedule, steps, start_t=None if renoise is None else renoise[1])
        S = table.num_steps
        noise = GumbelSource(seed_key_array(seeds), K + 1, N, S)
        x = self.initial_tokens(seeds, table, renoise)
        if fixed is not None:
            x0, keep = np.asarray(fixed[0], dtype=np.int64), np.asarray(fixed[1], dtype=bool)
            x = np.where(keep, x0, x)
        for i in range(S):
            tokens = np.concatenate([x, x]) if use_null else x
            t = np.full(rows.shape[0], table.t[i], dtype=np.int64)
            logits = to_numpy(self.denoise(wrap(tokens), wrap(t), wrap(rows)))
            x = stepmath.sample_step(logits, x, table.row(i), noise(i), guidance=guidance, truncation=truncation,
                                     use_null=use_null)
            if fixed is not None:
                x = np.where(keep, x0, x)
            if callback is not None:
                callback(i + 1, S)
        return wrap(x)

    # ------------------------------------------------------------------------- device state and steps

    def new_state(self, batch: int, steps: int, guidance: float, truncation: float, dim: int,
                  start_t: int | None = None) -> LoopState:
        import torch

        use_null = guidance != 1.0
        dev = self.device
        return LoopState(table=stepmath.build_step_table(self.schedule, steps, dev, start_t=start_t),
                         keys=torch.zeros(batch, 2, dtype=torch.int64, device=dev),
                         rows=torch.zeros((2 if use_null else 1) * batch, dim, device=dev),
                         x=torch.full((batch, self.seq_len), self.num_classes, dtype=torch.int64, device=dev),
                         x0=torch.zeros((batch, self.seq_len), dtype=torch.int64, device=dev),
                         keep=torch.zeros((batch, self.seq_len), dtype=torch.bool, device=dev),
                         step=torch.zeros(1, dtype=torch.int64, device=dev), guidance=float(guidance),
                         truncation=float(truncation))

    def load(self, state: LoopState, cond, null, seeds: list[int], fixed=None, renoise=None) -> None:
        """Reset `state` for a new batch in place (keeps the buffers' addresses for graph replay)."""
        import torch

        B = state.batch
        assert cond.shape[0] == B and len(seeds) == B, (cond.shape, len(seeds), B)
        state.rows[:B].copy_(torch.as_tensor(cond))
        if state.use_null:
            state.rows[B:].copy_(torch.as_tensor(null).to(state.rows).expand(B, -1))
        state.keys.copy_(torch.from_numpy(seed_key_array(seeds)))
        if fixed is None:
            state.keep.zero_()
        else:
            state.x0.copy_(torch.as_tensor(np.asarray(fixed[0], dtype=np.int64)))
            state.keep.copy_(torch.as_tensor(np.asarray(fixed[1], dtype=bool)))
        state.x.copy_(torch.from_numpy(self.initial_tokens(seeds, state.table, renoise)))
        state.x.copy_(torch.where(state.keep, state.x0, state.x))
        state.step.zero_()

    def device_step(self, state: LoopState, noise=None) -> None:
        """One step reading the step index from device memory (no host values: capturable in a CUDA graph)."""
        import torch

        R = state.rows.shape[0]
        t = state.table.t.index_select(0, state.step).expand(R)  # [R]
        tokens = state.x.repeat(2, 1) if state.use_null else state.x
        logits = self.denoise(tokens, t, state.rows)
        if self.kernels is not None:
            self.kernels.sample_step(logits.float().contiguous(), state.x, state.x, state.table.terms, state.step,
                                     state.keys, guidance=state.guidance, truncation=state.truncation,
                                     use_null=state.use_null)
            self.kernels.advance_step(state.step)
            state.x.copy_(torch.where(state.keep, state.x0, state.x))  # fixed tokens: a device-side mask
            return
        if noise is None:
            noise = gumbel_noise(state.keys, state.step[0], self.num_classes + 1, self.seq_len)
        x = stepmath.sample_step(logits, state.x, state.table.row(state.step), noise, guidance=state.guidance,
                                 truncation=state.truncation, use_null=state.use_null)
        state.x.copy_(torch.where(state.keep, state.x0, x))  # fixed tokens (editing): a device-side mask, no sync
        state.step.add_(1)

    def _run_device(self, cond, null, seeds, steps, guidance, truncation, callback, fixed=None, renoise=None):
        import torch

        with torch.no_grad():
            cond = torch.as_tensor(cond).to(self.device, torch.float32)
            null = torch.as_tensor(null).to(self.device, torch.float32)
            state = self.new_state(cond.shape[0], steps, guidance, truncation, cond.shape[1],
                                   None if renoise is None else renoise[1])
            self.load(state, cond, null, seeds, fixed, renoise)
            S = state.table.num_steps
            for i in range(S):
                self.device_step(state)
                if callback is not None:
                    callback(i + 1, S)
            return state.x.clone()
