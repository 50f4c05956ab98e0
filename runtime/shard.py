"""A prompt set generated into a folder: resumable, shareable over processes (torchrun), with a JSONL manifest.

`generate_folder(pipe, prompts, out)` writes image j of prompt i to the same file name `cvqd-run` uses for a
directory (`NNN-<prompt>-s<seed>.png`, NNN = i * num_images + j) with seed `seed + j * best_of`: an image depends
only on (prompt, prompt index, image index) and the settings, never on which process made it or what else was in
its batch (Philox noise is keyed by the seed). So the set is the same for any number of processes, and a rerun
keeps the files that already hold the image it would make (same prompt, seed range, settings and model, read back
from the parameters embedded in each file) and makes only the missing ones.

Processes: launched by `torchrun`, each process (rank r of W) takes images r, r + W, r + 2W, ... of the set; one
gloo process group gathers the records at the end, and rank 0 writes `manifest.jsonl` (one line per image of the
set, in order: index, prompt, seed, file, settings, whether it was made in this run or kept) and the summary.
A plain single process is world size 1 and needs no torch. On GPUs each rank uses its local device
(`cuda:LOCAL_RANK`).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from cvqd.errors import CvqdError
from cvqd.io import atomic_write_bytes

MANIFEST = "manifest.jsonl"
GATHER_TIMEOUT = datetime.timedelta(hours=24)  # ranks that finish early wait this long for the others


@dataclass
class Ranks:
    """This process's place among the processes of a run: rank r of `world` (torchrun's RANK / WORLD_SIZE)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _own_group: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Ranks":
        """From torchrun's environment; world size 1 without it. world > 1 joins a gloo process group."""
        env = os.environ if env is None else env

        def num(name: str, default: int) -> int:
            text = env.get(name)
            if text is None:
                return default
            try:
                return int(text)
            except ValueError:
                raise CvqdError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None

        world, rank, local = num("WORLD_SIZE", 1), num("RANK", 0), num("LOCAL_RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise CvqdError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a run "
                            f"(expected 0 <= RANK < WORLD_SIZE)")
        ranks = cls(rank, world, local)
        if world > 1:
            try:
                import torch.distributed as dist
            except ImportError:
                raise CvqdError("generation over several processes (torchrun) needs torch.distributed: "
                                "pip install 'cvqd[gpu]' (or 'cvqd[train]')") from None
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
                ranks._own_group = True
        return ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (collective)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def device(self, device: str | None) -> str | None:
        """The device this rank runs on: "cuda" (or, with several ranks and none named, a visible GPU) becomes
        cuda:LOCAL_RANK; anything else as given."""
        if self.world == 1:
            return device
        if device == "cuda" or (device is None and _gpu_count() > 0):
            count = _gpu_count()
            return f"cuda:{self.local_rank % count}" if count else device
        return device

    def close(self) -> None:
        if self._own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._own_group = False


def _gpu_count() -> int:
    from cvqd.runtime.backend import cuda_available

    if not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


@dataclass(frozen=True)
class FolderJob:
    """Image `index` of a prompt set: image `image_index` of prompt `prompt_index`, first candidate seed `seed`."""

    index: int
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    path: Path


def folder_names(folder: Path, prompts: list[str], num_images: int, seeds: list[int]) -> list[Path]:
    """`NNN-<prompt>-s<seed>.png` per (prompt, image), prompt-major, index and seed zero-padded so they sort."""
    from cvqd.images import slug

    total = len(prompts) * num_images
    iw, sw = max(3, len(str(total - 1))), len(str(max(seeds)))
    return [folder / f"{i * num_images + j:0{iw}d}-{slug(p)}-s{s:0{sw}d}.png"
            for i, p in enumerate(prompts) for j, s in enumerate(seeds)]


def folder_jobs(prompts: list[str], folder: str | os.PathLike, num_images: int = 1, seed: int = 0,
                best_of: int = 1) -> list[FolderJob]:
    """The whole set, in order (what every rank computes identically before taking its share)."""
    seeds = [seed + j * best_of for j in range(num_images)]
    names = folder_names(Path(folder), prompts, num_images, seeds)
    return [FolderJob(i * num_images + j, i, j, p, seeds[j], names[i * num_images + j])
            for i, p in enumerate(prompts) for j in range(num_images)]


def already_made(job: FolderJob, want: dict[str, Any], best_of: int) -> dict[str, Any] | None:
    """The parameters embedded in job.path when that file holds the image this request would make, else None."""
    from cvqd.images import read_image_params

    if not job.path.is_file():
        return None
    try:
        have = read_image_params(job.path)
    except (OSError, ValueError):  # unreadable or not an image: made again
        return None
    if have.get("prompt") != job.prompt or any(have.get(k) != v for k, v in want.items()):
        return None
    if int(have.get("best_of", 1)) != best_of:
        return None
    seed = have.get("seed")
    return have if isinstance(seed, int) and job.seed <= seed < job.seed + best_of else None


def generate_folder(pipe, prompts: list[str], out: str | os.PathLike, *, num_images: int = 1, seed: int = 0,
                    best_of: int | None = None, batch_size: int = 8, steps: int | None = None,
                    guidance: float | None = None, truncation: float | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, ranks: Ranks | None = None,
                    overwrite: bool = False, callback: Callable[[int, int], None] | None = None,
                    on_image: Callable[[Any, Path], None] | None = None,
                    on_plan: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate this rank's share of the set into folder `out`; -> the run's summary (the same on every rank):
    total, made, kept, processes, seconds (the slowest rank), images_per_s, manifest, records (every image's
    manifest record, in order).

    Skips images already in the folder with the same prompt, seed, settings and model (`overwrite=True`
    regenerates them). `on_plan(to_make, kept)` is called once this rank knows its work; `callback(done, total)`
    counts its reverse steps; `on_image(generated, path)` runs after each file is written. Collective when ranks.world > 1: every rank must call it with the same
    arguments. Rank 0 writes `out/manifest.jsonl`.
    """
    from cvqd.images import save_image
    from cvqd.runtime.pipeline import check_seed, validate_prompts

    ranks = ranks or Ranks()
    prompts = validate_prompts(prompts)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise CvqdError(f"num_images must be an integer >= 1, got {num_images!r}")
    best_of = pipe.config.sampling.best_of if best_of is None else best_of
    check_seed(seed, num_images * best_of)
    settings = pipe.resolve(steps, guidance, truncation, temperature, top_k, top_p)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = folder_jobs(prompts, folder, num_images, seed, best_of)
    mine = jobs[ranks.rank::ranks.world]
    # what a file must hold to count as already made (besides prompt and seed): the request's sampling settings
    # (steps, guidance, truncation; or guidance, temperature, top_k, top_p), the model and its preset
    want = {**settings, "model": pipe.model_id, "preset": pipe.config.preset}
    records: list[dict[str, Any]] = []
    todo: list[FolderJob] = []
    for job in mine:
        have = None if overwrite else already_made(job, want, best_of)
        if have is None:
            todo.append(job)
        else:
            records.append(_record(job, have, "kept", ranks.rank))
    if on_plan is not None:
        on_plan(len(todo), len(records))
    t0 = time.perf_counter()
    if todo:
        for g in _generate(pipe, todo, seed, best_of, batch_size, settings, callback):
            job = todo[g.position]  # generate_from's row
            save_image(job.path, g.image, g.params)
            records.append(_record(job, g.params, "made", ranks.rank))
            if on_image is not None:
                on_image(g, job.path)
    elif callback is not None:
        callback(0, 0)
    seconds = time.perf_counter() - t0
    parts = ranks.gather({"records": records, "seconds": seconds, "made": len(todo)})
    every = sorted((r for p in parts for r in p["records"]), key=lambda r: r["index"])
    made = sum(p["made"] for p in parts)
    wall = max(p["seconds"] for p in parts)
    summary = {"folder": str(folder), "total": len(jobs), "made": made, "kept": len(jobs) - made,
               "processes": ranks.world, "seconds": round(wall, 3),
               "images_per_s": round(made / wall, 3) if made and wall > 0 else None,
               "manifest": str(folder / MANIFEST), "records": every}
    if ranks.main:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in every)
        atomic_write_bytes(folder / MANIFEST, text.encode("utf-8"))
    return summary


def _generate(pipe, todo: list[FolderJob], seed: int, best_of: int, batch_size: int, settings: dict,
              callback) -> Iterator[Any]:
    """The images of `todo`, in its order, through Pipeline.generate_from."""
    yield from pipe.generate_from(pipe.prompt_conditions([j.prompt for j in todo]), [j.prompt for j in todo],
                                  seed=seed, index=[j.image_index for j in todo], batch_size=batch_size,
                                  best_of=best_of, callback=callback, **settings)


def _record(job: FolderJob, params: dict[str, Any], status: str, rank: int) -> dict[str, Any]:
    """One manifest line: where the image is, what made it, and whether this run made it or kept it."""
    rec = {"index": job.index, "prompt_index": job.prompt_index, "image_index": job.image_index,
           "file": job.path.name, "status": status, "rank": rank}
    rec.update({k: v for k, v in params.items() if k not in rec})
    return rec


def read_manifest(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `folder/manifest.jsonl` (or a manifest file itself), with `path` resolved."""
    path = Path(folder)
    path = path / MANIFEST if path.is_dir() else path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CvqdError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise CvqdError(f"manifest {path} line {n} is not JSON ({exc.msg}); expected one record per line "
                            f"as cvqd-run writes") from None
        if not isinstance(rec, dict) or "file" not in rec or "prompt" not in rec:
            raise CvqdError(f"manifest {path} line {n} has no 'file' and 'prompt'; expected cvqd-run's records")
        rec["path"] = str(path.parent / rec["file"])
        out.append(rec)
    if not out:
        raise CvqdError(f"manifest {path} holds no record")
    return out


