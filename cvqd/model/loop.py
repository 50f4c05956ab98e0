"""The reverse-diffusion loop, written once against a small denoiser interface.

    all-[MASK] x [B, N] -> for each (t, s) step: denoiser logits on R rows [conditional; null]
    -> guidance -> truncation -> posterior -> Gumbel-max (Philox noise keyed by each image's seed) -> x_0 tokens

A caller only supplies a `Denoise` (cvqd/model/sampling.py): tokens [R, N] int64, t [R] int64, cond [R, D]
float32 -> logits [R, K, N] float32, unnormalised (the transformer graph's contract in cvqd/model/contracts.py;
`DiffusionTransformer.logits` in training). The runtime's backends, training's sample grids and `cvqd-eval` all
sample through this loop. The step math runs either as the PyTorch implementation (cvqd/model/step.py; CPU, or a
GPU without the kernels) or as the fused CUDA kernels (kernels/sampling.cu, passed in by the runtime). The noise
is the same counter-based Philox stream in both, so a seed gives the same tokens on every backend up to the
denoiser's own numerics.

On a GPU every per-step value lives in device memory (the step index, the (t, s) table, the Philox keys), so
the step can be captured once in a CUDA graph and replayed (runtime/cuda_graph.py) with no host sync between
steps; `LoopState` holds those static buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cvqd.model import step as stepmath
from cvqd.model.rng import GumbelSource, gumbel_noise, seed_keys
from cvqd.model.sampling import Denoise
from cvqd.model.schedule import MaskReplaceSchedule
from cvqd.threads import torch_threads


Callback = Callable[[int, int], None]


@dataclass
class LoopState:
    """Static buffers of one loop shape (batch B, steps S, guided or not), all on the loop's device."""

    table: stepmath.StepTable  # t [S], terms [S, 9]
    keys: torch.Tensor  # [B, 2] int64 Philox keys (the images' seeds)
    rows: torch.Tensor  # [R, D] conditions: [cond; null] with guidance, cond without
    x: torch.Tensor  # [B, N] int64 current tokens
    step: torch.Tensor  # [1] int64 step index (read by the kernels and the graph)
    guidance: float
    truncation: float

    @property
    def use_null(self) -> bool:
        return self.rows.shape[0] == 2 * self.x.shape[0]

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


class ReverseLoop:
    """Samples x_0 tokens for conditions with a denoiser; `kernels` switches the step to the fused CUDA kernels."""

    def __init__(self, denoise: Denoise, schedule: MaskReplaceSchedule, seq_len: int, device: torch.device | str,
                 kernels=None, step_threads: int | None = None):
        self.denoise = denoise
        # CPU: torch intra-op threads for the step math while the loop runs (None = leave torch's setting). With
        # ONNX Runtime denoising on the same cores, 1 avoids two thread pools fighting over them.
        self.step_threads = step_threads
        self.schedule = schedule
        self.seq_len = seq_len
        self.num_classes = schedule.num_classes
        self.device = torch.device(device)
        self.kernels = kernels  # cvqd.kernels.sampling.SamplingKernels or None (torch step)

    @property
    def step_impl(self) -> str:
        return "cuda-kernels" if self.kernels is not None else "torch"

    # -------------------------------------------------------------------------------------- state

    def new_state(self, batch: int, steps: int, guidance: float, truncation: float, dim: int) -> LoopState:
        use_null = guidance != 1.0  # without guidance the null rows cannot change the result: skip them
        dev = self.device
        return LoopState(table=stepmath.build_step_table(self.schedule, steps, dev),
                         keys=torch.zeros(batch, 2, dtype=torch.int64, device=dev),
                         rows=torch.zeros((2 if use_null else 1) * batch, dim, device=dev),
                         x=torch.full((batch, self.seq_len), self.num_classes, dtype=torch.int64, device=dev),
                         step=torch.zeros(1, dtype=torch.int64, device=dev), guidance=float(guidance),
                         truncation=float(truncation))

    def load(self, state: LoopState, cond: torch.Tensor, null: torch.Tensor, seeds: list[int]) -> None:
        """Reset `state` for a new batch in place (keeps the buffers' addresses for graph replay)."""
        B = state.batch
        assert cond.shape[0] == B and len(seeds) == B, (cond.shape, len(seeds), B)
        state.rows[:B].copy_(cond)
        if state.use_null:
            state.rows[B:].copy_(null.to(cond).expand(B, -1))
        state.keys.copy_(seed_keys(seeds, "cpu"))
        state.x.fill_(self.num_classes)
        state.step.zero_()

    # -------------------------------------------------------------------------------------- steps

    def device_step(self, state: LoopState, noise: torch.Tensor | None = None) -> None:
        """One step reading the step index from device memory (no host values: capturable in a CUDA graph)."""
        R = state.rows.shape[0]
        t = state.table.t.index_select(0, state.step).expand(R)  # [R]
        tokens = state.x.repeat(2, 1) if state.use_null else state.x
        logits = self.denoise(tokens, t, state.rows)
        if self.kernels is not None:
            self.kernels.sample_step(logits.float().contiguous(), state.x, state.x, state.table.terms, state.step,
                                     state.keys, guidance=state.guidance, truncation=state.truncation,
                                     use_null=state.use_null)
            self.kernels.advance_step(state.step)
            return
        if noise is None:
            noise = gumbel_noise(state.keys, state.step[0], self.num_classes + 1, self.seq_len)
        x = stepmath.sample_step(logits, state.x, state.table.row(state.step), noise, guidance=state.guidance,
                                 truncation=state.truncation, use_null=state.use_null)
        state.x.copy_(x)
        state.step.add_(1)

    def host_step(self, state: LoopState, i: int, noise: GumbelSource) -> None:
        """One step with the step index as a Python int (CPU: cheaper indexing, noise generated in chunks)."""
        R = state.rows.shape[0]
        t = state.table.t[i].expand(R)
        tokens = state.x.repeat(2, 1) if state.use_null else state.x
        logits = self.denoise(tokens, t, state.rows)
        state.x = stepmath.sample_step(logits, state.x, state.table.row(i), noise(i), guidance=state.guidance,
                                       truncation=state.truncation, use_null=state.use_null)

    # ---------------------------------------------------------------------------------------- run

    @torch.no_grad()
    def run(self, cond: torch.Tensor, null: torch.Tensor, seeds: list[int], *, steps: int, guidance: float,
            truncation: float, callback: Callback | None = None) -> torch.Tensor:
        """x_0 tokens [B, N] for conditions cond [B, D] (normalised) and the null condition null [D].

        Row b's noise comes from Philox keyed by seeds[b], so its tokens do not depend on the batch it is in.
        """
        state = self.new_state(cond.shape[0], steps, guidance, truncation, cond.shape[1])
        self.load(state, cond.to(self.device, torch.float32), null.to(self.device, torch.float32), seeds)
        S = state.table.num_steps
        if self.device.type == "cpu" and self.kernels is None:
            noise = GumbelSource(state.keys, self.num_classes + 1, self.seq_len, S)
            with torch_threads(self.step_threads):
                for i in range(S):
                    self.host_step(state, i, noise)
                    if callback is not None:
                        callback(i + 1, S)
        else:
            for i in range(S):
                self.device_step(state)
                if callback is not None:
                    callback(i + 1, S)
        return state.x.clone()
