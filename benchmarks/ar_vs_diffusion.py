"""CLIP-GEN (autoregressive) vs CLIP-VQDiffusion on the same VQGAN and CLIP: quality and latency side by side.

    python -m benchmarks.ar_vs_diffusion                       # the two bundled demo models
    python -m benchmarks.ar_vs_diffusion --runs 30 --threads 1 2

Quality: the two models' reports on the shapes benchmark's test split (cvqd-eval --prompts shapes:test -n 8 --seed
1000 --json, written by each recipe's closing stage), checked to be of these exact checkpoints (sha256) with the
same prompts, seeds and candidates; colour+shape at N = 1 (mean of the 8 seeds, with its standard error over seeds),
best of 8 by the model's CLIP and by the analyzer (oracle), in-distribution and held-out, full and short prompts.

Latency: one image at each model's default settings, ONNX Runtime on the CPU (the default backend), each model's
plan; the two pipelines run the same prompt/seed sequence interleaved (who goes first alternates) after warm-up.
Per run: `Pipeline.generate` end to end and the token loop inside it (`sample_tokens`).

KV cache: the AR model's token loop with its cache (one token's work per step: the torch backend, fp32) against
the same loop recomputing the whole prefix for every token (`ARTransformer.logits` on the tokens so far, the
no-cache reference), same seeds: the tokens must be identical, and the times show what the cache saves.

Diversity: images of one prompt over 8 seeds at each model's defaults; the share of token positions that differ
between two seeds and the mean absolute pixel difference, over 8 prompts.

Writes benchmarks/results/ar_vs_diffusion.json (provenance first: command, commit, AR model sha256, date, machine).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from benchmarks.common import MIN_RUNS, load_average, positive_int, provenance, run_main, summary, write_json

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a small red circle on the left", "a red circle", "a large blue square", "a green triangle at the top"]
GROUPS = (("full/in_distribution", "full prompts, in-distribution"), ("short/in_distribution", "short prompts, "
          "in-distribution"), ("full/held_out", "full prompts, held-out pairs"),
          ("short/held_out", "short prompts, held-out pairs"), ("in_distribution", "all in-distribution"),
          ("held_out", "all held-out"))


def quality(report_path: Path, sha256: str) -> dict:
    """The test-split figures of one model from its cvqd-eval report (refused when it is of another model)."""
    import json

    from cvqd.errors import CvqdError

    rep = json.loads(report_path.read_text())
    if rep.get("model_sha256") != sha256:
        raise CvqdError(f"{report_path} evaluates model {str(rep.get('model_sha256'))[:12]}, not {sha256[:12]}; "
                        f"re-run its cvqd-eval --prompts shapes:test")
    s = rep["settings"]
    n = s["num_candidates"]
    rows = {}
    for key, label in GROUPS:
        by_n = rep["table"][key]
        m = by_n[f"mean_of_{n}"]
        rows[key] = {"label": label, "prompts": m["prompts"], "n1": m["colour+shape"],
                     "n1_seed_se": m["colour+shape_seed_se"], f"best_of_{n}_clip": by_n[f"best_of_{n}"]["colour+shape"],
                     f"oracle_of_{n}": by_n[f"oracle_of_{n}"]["colour+shape"],
                     "clip_score": m.get("clip_score")}
    return {"report": str(report_path.relative_to(ROOT) if report_path.is_relative_to(ROOT) else report_path),
            "command": rep.get("command"), "settings": s, "groups": rows}


def timed(pipe, prompt: str, seed: int) -> dict[str, float]:
    loop = []
    real = pipe.sample_tokens

    def sample_tokens(*a, **k):
        t = time.perf_counter()
        out = real(*a, **k)
        loop.append((time.perf_counter() - t) * 1e3)
        return out

    pipe.sample_tokens = sample_tokens
    try:
        t = time.perf_counter()
        pipe.generate([prompt], seed=seed)
        total = (time.perf_counter() - t) * 1e3
    finally:
        del pipe.sample_tokens
    return {"end_to_end": total, "loop": sum(loop)}


def latency(plans: dict[str, Path], threads: int, runs: int, warmup: int) -> dict:
    from cvqd.runtime.pipeline import Pipeline

    os.environ["CVQD_ORT_THREADS"] = str(threads)
    pipes = {name: Pipeline.from_plan(path, backend="onnxruntime") for name, path in plans.items()}
    names = list(pipes)
    times = {n: {"end_to_end": [], "loop": []} for n in names}
    for i in range(warmup + runs):
        order = names if i % 2 == 0 else names[::-1]
        for n in order:
            t = timed(pipes[n], PROMPTS[i % len(PROMPTS)], i)
            if i >= warmup:
                for k, v in t.items():
                    times[n][k].append(v)
    return {n: {"settings": pipes[n].resolve(), "describe": pipes[n].describe(),
                "end_to_end": summary(times[n]["end_to_end"]), "loop": summary(times[n]["loop"])} for n in names}


DIVERSITY_PROMPTS = ["a small red circle on the left", "a red circle", "a large blue square", "a green triangle at the top",
                     "a purple triangle", "a small yellow square on the right", "an orange circle", "a blue triangle"]


def diversity(plans: dict[str, Path], seeds: int) -> dict:
    """How much images of one prompt differ between seeds, at each model's defaults (ONNX Runtime): the fraction
    of token positions that differ between two seeds, and the mean absolute pixel difference (0-255), averaged
    over seed pairs and prompts. Both models share the tokenizer, so the token figures are comparable."""
    import numpy as np

    from cvqd.runtime.pipeline import Pipeline

    out = {}
    for name, path in plans.items():
        pipe = Pipeline.from_plan(path, backend="onnxruntime")
        settings = pipe.resolve()
        tok_d, px_d = [], []
        for prompt in DIVERSITY_PROMPTS:
            cond = pipe.prompt_conditions([prompt] * seeds)
            tokens = np.asarray(pipe.sample_tokens(cond, list(range(seeds)), **settings))
            pixels = np.clip((np.asarray(pipe.backend.decode(tokens)) + 1) * 127.5, 0, 255)
            pairs = [(i, j) for i in range(seeds) for j in range(i + 1, seeds)]
            tok_d.append(np.mean([(tokens[i] != tokens[j]).mean() for i, j in pairs]))
            px_d.append(np.mean([np.abs(pixels[i] - pixels[j]).mean() for i, j in pairs]))
        out[name] = {"settings": settings, "token_difference": round(float(np.mean(tok_d)), 4),
                     "pixel_difference": round(float(np.mean(px_d)), 2), "prompts": len(DIVERSITY_PROMPTS),
                     "seeds": seeds}
    return out


def cache_check(ckpt: Path, threads: int, runs: int) -> dict:
    """The cached token loop vs recomputing the prefix for every token (torch, fp32, same seeds, same tokens)."""
    import numpy as np
    import torch

    from cvqd.errors import CvqdError
    from cvqd.model.ar_loop import ARLoop
    from cvqd.runtime.pipeline import Pipeline
    from cvqd.threads import set_torch_threads

    set_torch_threads(threads)
    pipe = Pipeline.from_checkpoint(ckpt, device="cpu", precision="fp32")
    from cvqd.model.clipvqd import load_model

    ar = load_model(ckpt).ar.eval()
    N, K = ar.cfg.seq_len, ar.cfg.num_classes

    def prefill(rows):  # the no-cache reference: its "cache" is the tokens so far; each step re-runs the prefix
        state = {"cond": rows, "tokens": torch.zeros(rows.shape[0], N, dtype=torch.int64)}
        return ar.logits(state["tokens"][:, :1], rows)[:, 0], state

    def decode(token, position, state):
        n = int(position[0]) + 1  # the token to predict next
        state["tokens"][:, n - 1] = token
        return ar.logits(state["tokens"][:, :n + 1], state["cond"])[:, n], state

    reference = ARLoop(prefill, decode, K, N)
    settings = pipe.resolve()
    cond = torch.from_numpy(pipe.prompt_conditions(PROMPTS[:1]))
    cached_ms, full_ms = [], []
    with torch.no_grad():
        for i in range(runs + 2):
            t = time.perf_counter()
            a = pipe.sample_tokens(cond, [i], **settings)
            ca = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            b = reference.run(cond, pipe.null, [i], **settings)
            fb = (time.perf_counter() - t) * 1e3
            if not torch.equal(a, b):
                raise CvqdError(f"the cached and the recomputed token loops disagree at seed {i} "
                                f"({int((a != b).sum())} of {N} tokens)")
            if i >= 2:
                cached_ms.append(ca)
                full_ms.append(fb)
    return {"tokens_equal_runs": runs, "threads": threads, "settings": settings,
            "cached": summary(cached_ms), "recompute_prefix": summary(full_ms),
            "speedup": round(float(np.median(full_ms) / np.median(cached_ms)), 2)}


def main() -> None:
    from cvqd.io import file_sha256
    from cvqd.model.plan import load_plan

    ap = argparse.ArgumentParser(prog="python -m benchmarks.ar_vs_diffusion", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusion", type=Path, default=ROOT / "cvqd/assets/demo.pt")
    ap.add_argument("--diffusion-plan", type=Path, default=ROOT / "cvqd/assets/demo-plan")
    ap.add_argument("--diffusion-report", type=Path, default=ROOT / "docs/results/demo_quality.json")
    ap.add_argument("--ar", type=Path, default=ROOT / "cvqd/assets/demo-ar.pt")
    ap.add_argument("--ar-plan", type=Path, default=ROOT / "cvqd/assets/demo-ar-plan")
    ap.add_argument("--ar-report", type=Path, default=ROOT / "docs/results/demo_ar_quality.json")
    ap.add_argument("--runs", type=positive_int, default=MIN_RUNS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[1])
    ap.add_argument("--out", default="ar_vs_diffusion.json")
    args = ap.parse_args()
    ckpts = {"diffusion": args.diffusion, "ar": args.ar}
    plans = {"diffusion": args.diffusion_plan, "ar": args.ar_plan}
    sha = {k: file_sha256(p) for k, p in ckpts.items()}
    for k, p in plans.items():  # each plan must be its checkpoint's export
        plan = load_plan(p)
        if plan.source.get("sha256") != sha[k]:
            from cvqd.errors import CvqdError

            raise CvqdError(f"{p} was not exported from {ckpts[k]}; re-export it with cvqd-export --force")
    rec = {**provenance(args.ar), "load_average": load_average(),
           "models": {k: {"checkpoint": str(ckpts[k].relative_to(ROOT) if ckpts[k].is_relative_to(ROOT) else ckpts[k]),
                          "sha256": sha[k], "plan": str(plans[k].name)} for k in ckpts},
           "quality": {"diffusion": quality(args.diffusion_report, sha["diffusion"]),
                       "ar": quality(args.ar_report, sha["ar"])}}
    q = rec["quality"]
    same = ("prompts", "seed", "num_candidates")
    if any(q["diffusion"]["settings"][k] != q["ar"]["settings"][k] for k in same):
        from cvqd.errors import CvqdError

        raise CvqdError(f"the two reports differ in {same}; evaluate both on the same test split")
    rec["latency"] = {str(t): latency(plans, t, args.runs, args.warmup) for t in args.threads}
    rec["diversity"] = diversity(plans, 8)
    rec["kv_cache"] = cache_check(args.ar, args.threads[0], args.runs)
    rec["load_average_end"] = load_average()
    path = write_json(args.out, rec)
    for t, lat in rec["latency"].items():
        print(f"threads {t}: " + "; ".join(f"{n} {v['end_to_end']['median_ms']:.1f} ms end to end, "
                                            f"{v['loop']['median_ms']:.1f} ms loop" for n, v in lat.items()))
    kv = rec["kv_cache"]
    print(f"KV cache: {kv['cached']['median_ms']:.1f} ms vs {kv['recompute_prefix']['median_ms']:.1f} ms recomputing "
          f"the prefix ({kv['speedup']}x), same tokens in {kv['tokens_equal_runs']} runs")
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.ar_vs_diffusion")
