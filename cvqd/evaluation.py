"""`cvqd-eval`: does a model draw what the prompt asks for? The shapes benchmark protocol.

For every prompt, N candidates are generated (seeds seed .. seed+N-1). Each candidate gets
  - the analyzer's verdict (training/shapes.py: colour, shape, size, position read back without a learned model),
  - a CLIP score: cosine between the prompt's text embedding and the image's embedding (the model's own CLIP by
    default, or any open_clip model from a weights file).
Best-of-N keeps, per prompt, the candidate with the highest CLIP score (the paper's protocol: 16 candidates,
keep the best); best-of-1 is candidate 0. The report gives per-attribute accuracy, colour+shape accuracy,
all-attributes accuracy and the mean CLIP score, separately for in-distribution and held-out colour/shape
combinations, for N = 1 and the chosen N.

`sweep` runs the same at N = 1 over a grid of guidance scales and truncation rates.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cvqd.errors import CvqdError
from cvqd.machine import describe_machine
from cvqd.training.shapes import HELD_OUT, SPLIT_SEEDS, analyze, benchmark_prompts, parse_prompt

ATTRS = ("colour", "shape", "size", "position")


@dataclass
class PromptSpec:
    prompt: str
    wanted: dict[str, str]  # attributes the prompt names
    held_out: bool
    kind: str = "full"  # full | short | short+1 | rephrased (the split prompt sets); "file" for a user's file


def shapes_prompts() -> list[PromptSpec]:
    return [PromptSpec(p, {k: getattr(a, k) for k in ATTRS}, a.held_out) for p, a in benchmark_prompts()]


# The split shapes benchmark. Recipe and sampling decisions look at "validation" only; reported figures come from
# "test": other prompts where the kind has enough of them, and always other seeds (SPLIT_SEEDS: the first of the
# split's seeds; candidate j of a prompt uses seed + j).
PROMPT_KINDS = ("full", "short", "short+1", "rephrased")
_REPHRASE = {"validation": ("a picture of {}",), "test": ("a photo of {}", "an image of {}")}


def split_prompts(split: str) -> list[PromptSpec]:
    """The prompts of one split of the shapes benchmark, every kind.

    - full: "a small red circle on the left"; each colour/shape pair's 10 (size, position) prompts alternate
      between the splits (90 each).
    - short: "a red circle", all 18 pairs in both splits (there is one per pair; the splits' seeds differ).
    - short+1: colour + shape + one of size, position or background ("a small red circle", "a red circle on the
      left", "a red circle on a black background"); each pair's 9 alternate between the splits.
    - rephrased: the short prompts and one full prompt per pair in other words ("a picture of a red circle";
      validation and test use different phrasings).
    """
    from cvqd.training.shapes import BACKGROUNDS, COLOURS, POSITION_PHRASE, SHAPES, SIZES

    if split not in SPLIT_SEEDS:
        raise CvqdError(f"unknown benchmark split {split!r}; expected one of {list(SPLIT_SEEDS)}")
    parity = 0 if split == "validation" else 1
    out: list[PromptSpec] = []

    def add(prompt: str, wanted: dict[str, str], kind: str) -> None:
        out.append(PromptSpec(prompt, wanted, (wanted["colour"], wanted["shape"]) in HELD_OUT, kind))

    for c, s in itertools.product(COLOURS, SHAPES):
        pair = {"colour": c, "shape": s}
        full = [(f"a {z} {c} {s} {POSITION_PHRASE[p]}", {**pair, "size": z, "position": p})
                for z, p in itertools.product(SIZES, POSITION_PHRASE)]
        for prompt, wanted in full[parity::2]:
            add(prompt, wanted, "full")
        add(f"a {c} {s}", pair, "short")
        one = ([(f"a {z} {c} {s}", {**pair, "size": z}) for z in SIZES]
               + [(f"a {c} {s} {POSITION_PHRASE[p]}", {**pair, "position": p}) for p in POSITION_PHRASE]
               + [(f"a {c} {s} on a {b} background", {**pair, "background": b}) for b in BACKGROUNDS])
        for prompt, wanted in one[parity::2]:
            add(prompt, wanted, "short+1")
        for template in _REPHRASE[split]:
            add(template.format(f"a {c} {s}"), pair, "rephrased")
            prompt, wanted = full[parity]
            add(template.format(prompt), wanted, "rephrased")
    return out


def load_prompts(source: str | os.PathLike | None) -> list[PromptSpec]:
    """The shapes benchmark (None or "shapes"), one split of it ("shapes:validation", "shapes:test": every
    prompt kind), or a text file with one prompt per line (attributes parsed)."""
    if source is None or str(source) == "shapes":
        return shapes_prompts()
    if str(source).startswith("shapes:"):
        return split_prompts(str(source).split(":", 1)[1])
    path = Path(source)
    if not path.is_file():
        raise CvqdError(f"prompt file not found: {path} (give a text file with one prompt per line, or 'shapes')")
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise CvqdError(f"prompt file {path} holds no prompts")
    specs = []
    for n, ln in enumerate(lines, 1):
        wanted = parse_prompt(ln)
        if not wanted:  # nothing the analyzer could check: scoring it would count as right by default
            raise CvqdError(f"{path}: prompt {n} {ln[:60]!r} names no colour, shape, size or position the analyzer "
                            f"reads; every prompt must name at least one (e.g. 'a red circle')")
        specs.append(PromptSpec(ln, wanted, (wanted.get("colour"), wanted.get("shape")) in HELD_OUT))
    return specs


class Scorer:
    """CLIP text-image cosine with the model's own CLIP, or an open_clip model from a weights file."""

    def __init__(self, ckpt: str | os.PathLike, device: str, clip_model: str | None = None,
                 clip_weights: str | os.PathLike | None = None, model_clip_weights: str | os.PathLike | None = None):
        from cvqd.model.clipvqd import load_model

        if clip_weights is not None:
            from cvqd.model.config import ClipConfig
            from cvqd.model.clip import (ClipEncoder, build_clip, clip_image_size, clip_state_from_file,
                                         load_clip_weights, open_clip_embed_dim)

            name = clip_model or "ViT-B-32"
            ccfg = ClipConfig(model_name=name, tokenizer=name, embed_dim=open_clip_embed_dim(name))
            model = build_clip(ccfg)
            load_clip_weights(model, clip_state_from_file(clip_weights), str(clip_weights))
            self.clip = ClipEncoder(ccfg.replace(image_size=clip_image_size(model, 224)), model)
            self.name = name
        else:
            m = load_model(ckpt, clip_weights=model_clip_weights)
            self.clip = m.require_clip()
            self.name = f"model's own ({m.cfg.clip.model_name})"
        self.clip = self.clip.eval().to(device)
        self.device = device

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(self.clip.tokenize(prompts))

    @torch.no_grad()
    def image(self, images: list) -> torch.Tensor:
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                         for im in images]) / 127.5 - 1.0
        return self.clip.encode_image(x.to(self.device))


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per attribute (over prompts naming it), colour+shape, all named attributes, mean CLIP score.

    A row judges one image (`correct` holds booleans) or, for the candidate mean, carries per-prompt fractions
    (`correct` holds floats, with `colour+shape` and `all` fractions given). colour+shape also gets its standard
    error over prompts (`colour+shape_se`), which says how far two reports can differ by sampling alone.
    """
    if not rows:
        return {"prompts": 0}
    out: dict[str, Any] = {"prompts": len(rows)}
    for k in ATTRS:
        hits = [r["correct"][k] for r in rows if k in r["correct"]]
        out[k] = float(np.mean(hits)) if hits else None
    cs = [r.get("colour+shape", r["correct"]["colour"] and r["correct"]["shape"]) for r in rows
          if "colour" in r["correct"] and "shape" in r["correct"]]
    out["colour+shape"] = float(np.mean(cs)) if cs else None
    out["colour+shape_se"] = float(np.std(cs, ddof=1) / np.sqrt(len(cs))) if len(cs) > 1 else None
    out["all"] = float(np.mean([r.get("all", all(r["correct"].values())) for r in rows]))
    out["clip_score"] = float(np.mean([r["clip_score"] for r in rows]))
    return out


def _candidate_mean(judged: list[dict[str, bool]], scores: list[float]) -> dict[str, Any]:
    """One prompt's expected N = 1 result: every candidate is an independent single draw, so average them all."""
    out: dict[str, Any] = {"correct": {k: float(np.mean([j[k] for j in judged])) for k in judged[0]},
                           "all": float(np.mean([all(j.values()) for j in judged])),
                           "clip_score": float(np.mean(scores))}
    if "colour" in judged[0] and "shape" in judged[0]:
        out["colour+shape"] = float(np.mean([j["colour"] and j["shape"] for j in judged]))
    return out


def _seed_spread(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """colour+shape accuracy per seed (candidate j of every prompt is one seed's draw): mean and standard error
    over the seeds, the spread a report at N = 1 has from its seeds alone."""
    if not rows:
        return {}
    per_seed = np.mean([r["per_seed"] for r in rows], axis=0)  # [N]
    se = float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else None
    return {"colour+shape_seeds": [round(float(x), 4) for x in per_seed], "colour+shape_seed_se": se}


def evaluate(ckpt: str | os.PathLike, prompts: list[PromptSpec] | None = None, *, num_candidates: int = 16,
             seed: int = 0, steps: int | None = None, guidance: float | None = None, truncation: float | None = None,
             batch_size: int = 16, device: str = "cpu", clip_weights: str | os.PathLike | None = None,
             score_clip_model: str | None = None, score_clip_weights: str | os.PathLike | None = None,
             save_images: str | os.PathLike | None = None, scorer: Scorer | None = None, pipe=None,
             progress: Callable[[int, int], None] | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None) -> dict[str, Any]:
    """Generate, analyse and score; -> a report dict (settings, table, per-prompt rows). Diffusion models take
    steps / guidance / truncation, autoregressive ones guidance / temperature / top_k / top_p."""
    from cvqd.runtime.pipeline import Pipeline

    prompts = prompts if prompts is not None else shapes_prompts()
    if num_candidates < 1:
        raise CvqdError(f"num_candidates must be >= 1, got {num_candidates}")
    pipe = pipe or Pipeline.from_checkpoint(ckpt, device=device, clip_weights=clip_weights)
    scorer = scorer or Scorer(ckpt, device, score_clip_model, score_clip_weights, clip_weights)
    settings = pipe.resolve(steps, guidance, truncation, temperature, top_k, top_p)
    t0 = time.perf_counter()
    texts = scorer.text([p.prompt for p in prompts])  # [P, D]
    rows_1, rows_n, rows_mean, rows_oracle, seed_rows, per_prompt = [], [], [], [], [], []
    chunk = max(1, batch_size // num_candidates) if num_candidates < batch_size else 1
    done = 0
    for start in range(0, len(prompts), chunk):
        group = prompts[start:start + chunk]
        gens = pipe.generate([p.prompt for p in group], seed=seed, num_images=num_candidates,
                             batch_size=batch_size, **settings)
        for j, spec in enumerate(group):
            cands = gens[j * num_candidates:(j + 1) * num_candidates]
            scores = (scorer.image([g.image for g in cands]) @ texts[start + j]).tolist()
            verdicts = [analyze(g.image) for g in cands]
            judged = [{k: getattr(v, k) == w for k, w in spec.wanted.items()} for v in verdicts]
            best = int(np.argmax(scores))
            base = {"prompt": spec.prompt, "held_out": spec.held_out, "kind": spec.kind}
            rows_1.append({**base, "correct": judged[0], "clip_score": scores[0]})
            rows_n.append({**base, "correct": judged[best], "clip_score": scores[best]})
            rows_mean.append({**base, **_candidate_mean(judged, scores)})
            hit = next((k for k, j in enumerate(judged) if all(j.values())), 0)
            rows_oracle.append({**base, "correct": judged[hit], "clip_score": scores[hit]})
            seed_rows.append({**base, "per_seed": [bool(j.get("colour", True) and j.get("shape", True))
                                                   for j in judged]})
            per_prompt.append({**base, "wanted": spec.wanted, "clip_scores": scores, "best": best,
                               "verdicts": [{k: getattr(v, k) for k in (*ATTRS, "background")} for v in verdicts]})
            if save_images is not None:
                _save_candidates(Path(save_images), start + j, spec.prompt, cands, best)
        done += len(group)
        if progress is not None:
            progress(done, len(prompts))
    groups = [("in_distribution", lambda r: not r["held_out"]), ("held_out", lambda r: r["held_out"]),
              ("all", lambda r: True)]
    kinds = list(dict.fromkeys(p.kind for p in prompts))
    if len(kinds) > 1:  # a split benchmark: every kind's in-distribution and held-out prompts on their own too
        for kind in kinds:
            groups += [(f"{kind}/in_distribution", lambda r, k=kind: r["kind"] == k and not r["held_out"]),
                       (f"{kind}/held_out", lambda r, k=kind: r["kind"] == k and r["held_out"])]
    table = {}
    for name, pick in groups:
        if "/" in name and not any(pick(r) for r in rows_1):
            continue
        table[name] = {"best_of_1": _summarise([r for r in rows_1 if pick(r)])}
        if num_candidates > 1:  # the N = 1 accuracy again, averaged over all candidates (far less sampling noise)
            mean = _summarise([r for r in rows_mean if pick(r)])
            mean.update(_seed_spread([r for r in seed_rows if pick(r)]))
            table[name][f"mean_of_{num_candidates}"] = mean
        table[name][f"best_of_{num_candidates}"] = _summarise([r for r in rows_n if pick(r)])
        if num_candidates > 1:  # reranked by the analyzer itself: an upper bound for any reranker
            table[name][f"oracle_of_{num_candidates}"] = _summarise([r for r in rows_oracle if pick(r)])
    return {"checkpoint": str(ckpt), "model": pipe.model_id, "settings": {**settings, "seed": seed,
            "num_candidates": num_candidates, "prompts": len(prompts), "scoring_clip": scorer.name},
            "table": table, "seconds": time.perf_counter() - t0, "machine": describe_machine(), "per_prompt": per_prompt}


def _save_candidates(root: Path, i: int, prompt: str, cands, best: int) -> None:
    from cvqd.images import grid, save_png, slug

    root.mkdir(parents=True, exist_ok=True)
    save_png(root / f"{i:03d}-{slug(prompt)}.png", grid([g.image for g in cands], cols=min(8, len(cands))),
             {"prompt": prompt, "best": best})


def sweep(ckpt: str | os.PathLike, guidances: list[float], truncations: list[float], prompts=None, *,
          num_candidates: int = 1, seed: int = 0, steps: int | None = None, batch_size: int = 16, device: str = "cpu",
          clip_weights=None, progress: Callable[[str], None] | None = None,
          top_ps: list[float] | None = None, temperature: float | None = None,
          top_k: int | None = None) -> list[dict[str, Any]]:
    """Summary rows of `evaluate` over every (guidance, truncation) pair; autoregressive models: every (guidance,
    top_p) pair (`truncations` must then be empty, `top_ps` None: the model's top_p).

    A row's "{split}/{metric}" columns are the N = 1 accuracy: candidate 0 when num_candidates is 1, else averaged
    over all candidates (each an independent single draw: less sampling noise for choosing N = 1 defaults). With
    num_candidates N > 1 the row also holds "best_of_N/{split}/{metric}" (CLIP-score reranking of N candidates).
    """
    from cvqd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(ckpt, device=device, clip_weights=clip_weights)
    scorer = Scorer(ckpt, device, model_clip_weights=clip_weights)
    ar = pipe.config.generator == "ar"
    if ar and truncations:
        raise CvqdError("truncation is a diffusion setting; sweep an autoregressive model over top_p instead")
    if not ar and top_ps:
        raise CvqdError("top_p is for autoregressive models; sweep a diffusion model over truncation instead")
    second = (top_ps or [pipe.config.sampling.top_p]) if ar else truncations
    out = []
    for g, r in itertools.product(guidances, second):
        knobs = {"top_p": r} if ar else {"truncation": r}
        rep = evaluate(ckpt, prompts, num_candidates=num_candidates, seed=seed, steps=steps, guidance=g,
                       batch_size=batch_size, device=device, scorer=scorer, pipe=pipe, temperature=temperature,
                       top_k=top_k, **knobs)
        table, n = rep["table"], num_candidates
        row = {"guidance": g, **knobs, "steps": rep["settings"].get("steps"), "seconds": rep["seconds"]}
        if ar:
            row.update(temperature=rep["settings"]["temperature"], top_k=rep["settings"]["top_k"])
        if n == 1:
            row.update(n1="candidate 0", **_table_columns(table, "best_of_1"))
        else:
            row.update(n1=f"mean of {n} candidates", **_table_columns(table, f"mean_of_{n}"),
                       **_table_columns(table, f"best_of_{n}", prefix=f"best_of_{n}/"))
        out.append(row)
        if progress is not None:
            progress(format_sweep_row(row))
    return out


def _table_columns(table: dict[str, Any], n_name: str, prefix: str = "") -> dict[str, Any]:
    """One N row of a report's table, flattened to "{prefix}{split}/{metric}" columns."""
    return {f"{prefix}{split}/{k}": v for split, by_n in table.items() for k, v in by_n[n_name].items()
            if k != "prompts"}


def format_sweep_row(row: dict[str, Any]) -> str:
    """One line: N = 1 colour+shape and all-attribute accuracy (and best-of-N when the row has it), CLIP score."""
    best = next((k.split("/")[0] for k in row if k.startswith("best_of_")), None)
    knob = f"r={row['truncation']:<5g}" if "truncation" in row else f"p={row['top_p']:<5g}"
    text = (f"s={row['guidance']:<5g} {knob} N=1 colour+shape in-dist "
            f"{row['in_distribution/colour+shape']:.3f} held-out {row['held_out/colour+shape']:.3f} | all-attr "
            f"{row['in_distribution/all']:.3f} / {row['held_out/all']:.3f} | CLIP {row['all/clip_score']:.3f}")
    if best is not None:
        text += (f" | {best.replace('best_of_', 'best-of-')} colour+shape {row[best + '/in_distribution/colour+shape']:.3f}"
                 f" / {row[best + '/held_out/colour+shape']:.3f}")
    return text


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the report (one row per split and N; "1 avg": N = 1 averaged over all candidates)."""
    cols = ("colour", "shape", "size", "position", "colour+shape", "all", "clip_score")
    lines = [f"{'split':<24} {'N':>5} {'prompts':>7} " + " ".join(f"{c:>12}" for c in cols)]
    for split, by_n in report["table"].items():
        for n_name, s in by_n.items():
            n = ("1 avg" if n_name.startswith("mean_of_") else
                 n_name.replace("oracle_of_", "") + " orc" if n_name.startswith("oracle_of_") else
                 n_name.removeprefix("best_of_"))
            vals = " ".join(f"{s[c]:>12.3f}" if isinstance(s.get(c), float) else f"{'-':>12}" for c in cols)
            lines.append(f"{split:<24} {n:>5} {s.get('prompts', 0):>7} {vals}")
    if any(k.startswith("mean_of_") for by_n in report["table"].values() for k in by_n):
        lines.append("N = '1 avg': the N = 1 accuracy averaged over every candidate (each is an independent single "
                     "draw), not just candidate 0; 'N orc': best of N picked by the analyzer itself (an upper bound "
                     "for any reranker)")
    return "\n".join(lines)
