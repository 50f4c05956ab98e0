"""What every training stage shares: distributed setup, data order, RNG state, LR schedule, EMA, run folders,
the starting model, the progress bar.

A run folder holds
    model.pt     the latest checkpoint (a normal cvqd checkpoint; `training` carries the resume state)
    log.jsonl    one JSON object per logged step (loss, lr, throughput, stage metrics)
    samples/     a grid of samples every `sample_every` steps
    run.json     the stage, its training config, its inputs (data folder, --init, CLIP source) and the
                 command-line arguments of the first start; `--resume` takes its settings from here

Distributed: under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) the process group is initialised with NCCL on
GPUs and gloo on CPU; every rank trains on its shard of each epoch (torch's DistributedSampler, seeded, epoch
by epoch), and only rank 0 writes files. Without torchrun the same code runs as a single process.

Exact resume: the data order is a pure function of (seed, epoch) and the step, every random draw of a stage
comes from a per-rank torch.Generator whose state is checkpointed (with torch's global RNG state), and the
optimizer, EMA, importance sampler and step travel in the checkpoint. Resuming at step k and running to n
gives the same weights as running straight to n (same world size and thread count).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from cvqd.errors import CvqdError
from cvqd.io import atomic_path, write_json

CKPT_NAME = "model.pt"
RUN_JSON = "run.json"


# ----------------------------------------------------------------------------------------- distributed

@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor from every rank along dim 0 (same shape on every rank)."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return x
        y = x.detach().clone()
        dist.all_reduce(y)
        return y / self.world

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment; initialise the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CvqdError("--device cuda was asked for but no CUDA GPU is visible")
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, dev)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(device: str | None, train: Callable[..., Any], *args: Any) -> Any:
    """`train(*args, env)` in this process's place in the job (torchrun's process group, or a single process),
    with the process group torn down afterwards whatever happens."""
    env = setup_distributed(device)
    try:
        return train(*args, env)
    finally:
        teardown_distributed()


def wrap_ddp(module: nn.Module, env: DistEnv, **kwargs) -> nn.Module:
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# ------------------------------------------------------------------------------------------ data order

def check_batch(n: int, batch_size: int, env: DistEnv) -> None:
    """A one-line error when `n` items do not fill one batch on every process (an epoch would have no step)."""
    if n // env.world < batch_size:
        raise CvqdError(f"{n} training items are too few for batch size {batch_size} x {env.world} process(es); "
                        f"use a smaller --batch-size or more data")


class BatchPlan:
    """Index batches for (seed, epoch, rank): torch's DistributedSampler, shuffled per epoch, drop_last.

    Each optimizer step consumes one batch per rank; `batches_from(step)` starts mid-epoch for exact resume.
    """

    def __init__(self, n: int, batch_size: int, env: DistEnv, seed: int):
        check_batch(n, batch_size, env)
        self.n, self.batch_size, self.env, self.seed = n, batch_size, env, seed
        self.per_rank = n // env.world
        self.steps_per_epoch = self.per_rank // batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        sampler = DistributedSampler(range(self.n), num_replicas=self.env.world, rank=self.env.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    def batches_from(self, step: int) -> Iterator[list[int]]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            idx = self.epoch_indices(epoch)
            for b in range(offset, self.steps_per_epoch):
                yield idx[b * self.batch_size:(b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0


# ------------------------------------------------------------------------------------------- RNG state

def make_generator(seed: int, env: DistEnv) -> torch.Generator:
    """The stage's random stream on this rank (CPU generator; draws are moved to the device)."""
    return torch.Generator().manual_seed(seed * 7919 + env.rank)


def seed_training_streams(seed: int, env: DistEnv) -> None:
    """Seed torch's global RNG for the training loop (per rank), after the models are built."""
    torch.manual_seed(seed * 1000 + 101 + env.rank)


def rng_state(gen: torch.Generator, env: DistEnv) -> dict[str, Any]:
    """Every rank's generator state and torch's global CPU (and CUDA) RNG, gathered to all ranks."""
    mine = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if env.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(env.device)
    return {"world": env.world, "ranks": env.gather_objects(mine)}


def restore_rng(state: dict[str, Any], gen: torch.Generator, env: DistEnv) -> bool:
    """Restore this rank's streams; False (fresh streams kept) when the world size changed."""
    if not state or state.get("world") != env.world:
        return False
    mine = state["ranks"][env.rank]
    gen.set_state(mine["gen"])
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and env.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], env.device)
    return True


# ------------------------------------------------------------------------------------ schedule and EMA

def lr_at(step: int, base: float, warmup: int, total: int, schedule: str = "cosine", final_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to `final_ratio * base` at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def cosine_anneal(step: int, total: int, start: float, end: float) -> float:
    """start -> end on a half cosine over `total` steps (the Gumbel temperature schedule)."""
    frac = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))


def adamw(module: nn.Module, lr: float, weight_decay: float, betas) -> tuple[list[nn.Parameter], torch.optim.AdamW]:
    """AdamW over the trainable parameters, weight decay on matrices only (not on biases, norms or vectors such
    as the null embedding); -> (those parameters, for gradient clipping; the optimizer)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return params, torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


class EMA:
    """Exponential moving average of a module's floating-point state; decay warms up as (1+n)/(10+n)."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items() if v.is_floating_point()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
        self.updates += 1

    def weights_for(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with the averaged values (non-float buffers as they are)."""
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v.detach().clone())
                for k, v in module.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


# ------------------------------------------------------------------------------------------ run folder

class RunDir:
    """A stage's output folder; only rank 0 writes."""

    def __init__(self, path: str | os.PathLike, env: DistEnv):
        self.path, self.env = Path(path), env

    @property
    def ckpt(self) -> Path:
        return self.path / CKPT_NAME

    def check(self, resume: bool) -> None:
        """Check --out before anything is written: --resume needs the run's checkpoint, a new run a folder without
        one, and the path must be (or be creatable as) a folder. Writes nothing, so a start that fails on its
        inputs (data, --init, batch size) leaves no folder behind; `create` makes it once they checked out."""
        if resume:
            if not self.ckpt.is_file():
                raise CvqdError(f"--resume: no checkpoint {self.ckpt} to resume from; start without --resume")
        elif self.ckpt.exists():
            raise CvqdError(f"{self.path} already holds a run ({CKPT_NAME}); pass --resume to continue it, "
                            f"or choose a new --out folder")
        # Checked on every rank: an error on rank 0 alone would leave the others failing at a barrier with a gloo
        # traceback instead of this one line.
        ancestor = self.path  # the folder itself, or the nearest part of its path that exists
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CvqdError(f"--out {self.path} exists and is not a folder" if ancestor == self.path
                            else f"cannot create {self.path}: {ancestor} is a file, not a folder")

    def create(self, resume: bool, stage: str, run_info: dict[str, Any]) -> None:
        """Make the folder (and samples/) and, for a new run, write run.json; every rank calls it (barrier)."""
        if self.env.is_main:
            try:  # missing parents are created, like `mkdir -p` (a run folder is new by design)
                (self.path / "samples").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CvqdError(f"cannot create {self.path}: {exc.strerror or exc}") from None
            if not resume:
                write_json(self.path / RUN_JSON, {"stage": stage, **run_info})
        self.env.barrier()

    def trim_log(self, step: int) -> None:
        """On resume, forget log lines written after the checkpoint (they will be written again)."""
        log = self.path / "log.jsonl"
        if not self.env.is_main or not log.is_file():
            return
        keep = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with atomic_path(log) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))

    def log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def sample_path(self, step: int) -> Path:
        return self.path / "samples" / f"step-{step:07d}.png"


def read_run_json(out: str | os.PathLike, stage: str | None = None) -> dict[str, Any]:
    """run.json of the run folder `out`: {"stage", "config", "data", "init", ...} as its first start recorded them.

    `--resume` takes the settings and the data path from it, so `--out DIR --resume` alone continues a run."""
    path = Path(out) / RUN_JSON
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
            raise ValueError
    except (OSError, ValueError):
        raise CvqdError(f"--resume: {out} holds no run to resume ({path} is missing or unreadable); "
                        "start without --resume") from None
    if stage is not None and info.get("stage") != stage:
        raise CvqdError(f"--resume: {out} holds a {info.get('stage')!r} run, not a {stage!r} one")
    # paths recorded as the string "None" mean: not given
    return {k: (None if v == "None" else v) for k, v in info.items()}


def path_str(path: str | os.PathLike | None) -> str | None:
    """A path as run.json records it: absolute (a resume may start elsewhere); None stays None."""
    return None if path is None else str(Path(path).absolute())


def initial_model(run: RunDir, resume: bool, init, preset: str | None, seed: int, what: str,
                  vqgan_changes: dict[str, Any] | None = None):
    """The model a stage starts from: the run's own checkpoint (--resume), an --init checkpoint, or a fresh preset
    seeded with `seed` (its VQGAN config with `vqgan_changes`); -> (checkpoint or None, model). A checkpoint
    whose VQGAN config differs from `vqgan_changes` is an error: those settings only shape a new model."""
    from cvqd.model.checkpoint import load_checkpoint
    from cvqd.model.config import preset as get_preset
    from cvqd.model.clipvqd import CLIPVQDiffusion, load_model

    ckpt = load_checkpoint(run.ckpt if resume else init) if (resume or init) else None
    if ckpt is None:
        if preset is None:
            raise CvqdError(f"give --init CHECKPOINT or --preset NAME to say which model's {what} to train")
        torch.manual_seed(seed)
        mcfg = get_preset(preset)
        if vqgan_changes:
            mcfg = mcfg.replace(vqgan=mcfg.vqgan.replace(**vqgan_changes))
        model = CLIPVQDiffusion(mcfg)
        model.meta = {"clip_random": True}  # a new model's CLIP is random until `cvqd-train clip` trains it
        return None, model
    model = load_model(ckpt)
    for key, want in (vqgan_changes or {}).items():
        have = getattr(model.cfg.vqgan, key)
        if have != want:
            raise CvqdError(f"the checkpoint's VQGAN has {key}={have!r}, not {want!r}; that setting applies to a new "
                            "model (--preset), so leave it out when continuing one")
    model.meta = dict(ckpt.meta)
    return ckpt, model


def warn(env: DistEnv, line: str | None) -> None:
    """Print a warning line on stderr, once (rank 0); None prints nothing."""
    if line and env.is_main:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar on stderr (rank 0) with loss and ETA; a no-op elsewhere or with quiet=True."""

    def __init__(self, total: int, initial: int, desc: str, env: DistEnv, quiet: bool = False):
        self.bar = None
        self.t0, self.start = time.perf_counter(), initial
        if env.is_main and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Temporarily put modules in eval mode (sample grids in the middle of training)."""
    was = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, w in zip(modules, was):
            m.train(w)
