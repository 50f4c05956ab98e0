"""Render the published tables (README.md, docs/export.md) from the result JSON files, or check that they match.

    python -m benchmarks.report            # rewrite the blocks between the report markers
    python -m benchmarks.report --check    # exit 1 (and show a diff) when a file differs from its rendering
    python -m benchmarks.report --print    # print the rendered blocks

A block sits between `<!-- report:NAME -->` and `<!-- /report:NAME -->` in README.md:
  performance  benchmarks/results/runtime_cpu.json (python -m benchmarks.runtime_cpu) and every
               benchmarks/results/runtime_gpu*.json (python -m benchmarks.runtime_gpu) that carries provenance
  quality      docs/results/demo_quality.json (cvqd-eval --prompts shapes:test -n 8 --seed 1000 --json ...) and the
               recipe records of the training seeds (cvqd/assets/demo.json, docs/results/demo_seed*.json)
  ar           benchmarks/results/ar_vs_diffusion.json (python -m benchmarks.ar_vs_diffusion): CLIP-GEN vs
               CLIP-VQDiffusion, quality on the test split and latency
and in docs/export.md:
  export-exporters  benchmarks/results/export_exporters_demo.json (python -m benchmarks.export_exporters)
  export-parity     benchmarks/results/export_cost_{demo,paper}.json (python -m benchmarks.export_cost)
  export-cost       the same files: wall time, peak memory, plan size of the whole cvqd-export command
  export-latency    benchmarks/results/export_latency_demo_fp32.json (python -m benchmarks.export_latency)
Only records with the provenance fields (command, commit, dirty, model_sha256, date, machine) are published;
every row names the machine (cvqd.machine.machine_words) and the commit it was measured at, and a model that is
not the bundled cvqd/assets/demo.pt is said to be so.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import MIN_RUNS
from cvqd.machine import machine_words

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNTIME_CPU = Path("benchmarks/results/runtime_cpu.json")
SLIM = Path("benchmarks/results/slim_runtime.json")
STEP_CPU = Path("benchmarks/results/step_cpu.json")
OFFICIAL_CPU = Path("benchmarks/results/official_cpu.json")
RUNTIME_GPU_GLOB = "benchmarks/results/runtime_gpu*.json"
QUALITY = Path("docs/results/demo_quality.json")
BUNDLED = Path("cvqd/assets/demo.pt")
PROVENANCE = ("command", "commit", "dirty", "model_sha256", "date", "machine")


class ReportError(Exception):
    """A block cannot be rendered (a missing file or marker)."""


def load(root: Path, rel: Path) -> dict[str, Any]:
    path = root / rel
    if not path.is_file():
        raise ReportError(f"{rel} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{rel} cannot be read as JSON ({exc})") from None


def missing_provenance(rec: dict[str, Any]) -> list[str]:
    return [k for k in PROVENANCE if k not in rec]


@functools.lru_cache(maxsize=None)
def bundled_sha256(root: Path) -> str | None:
    from cvqd.io import file_sha256

    path = root / BUNDLED
    return file_sha256(path) if path.is_file() else None


def model_words(rec: dict[str, Any], bundled: str | None, preset: str | None = None) -> str:
    sha = rec.get("model_sha256")
    if sha is None:
        return f"{preset or 'a'} preset, random weights"
    if sha == bundled:
        return f"bundled demo.pt (`{sha[:8]}`)"
    if preset and preset != "demo":
        return f"a {preset}-preset checkpoint (`{sha[:8]}`)"
    return f"`{sha[:8]}` (**not** the bundled demo.pt)"


def commit_words(rec: dict[str, Any]) -> str:
    commit = rec.get("commit")
    if not commit:
        return "unknown"
    return f"`{commit[:7]}`" + (" (dirty)" if rec.get("dirty") else "")


def machine_cell(rec: dict[str, Any]) -> str:
    m = rec["machine"]
    text = machine_words(m)
    if m.get("load_average"):
        text += f"; load {m['load_average'][0]:.2f}"
        if rec.get("load_average_end"):
            text += f" -> {rec['load_average_end'][0]:.2f}"
    return text


def ms(s: dict[str, float]) -> str:
    """median (p10-p90) in ms, to a precision that suits the size."""
    digits = 1 if s["median_ms"] < 1000 else 0
    return f"{s['median_ms']:.{digits}f} ({s['p10_ms']:.{digits}f}-{s['p90_ms']:.{digits}f})"


PERF_HEADER = ("| model | setting | cvqd (default) | end to end, ms | loop, ms | reference | end to end, ms | loop, ms "
               "| speed-up | runs | machine (load average) | commit |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|")


def cpu_rows(rec: dict[str, Any], bundled: str | None) -> list[str]:
    rows = []
    for res in rec["results"].values():
        ort, ref = res["onnxruntime"], res["torch"]
        precision = res["precision"]
        setting = (f"CPU, {res['threads']} thread{'s' if res['threads'] > 1 else ''}, {res['steps']} steps, "
                   f"guidance {res['guidance']:g}, truncation {res['truncation']:g}")
        rows.append(f"| {model_words(rec, bundled)} | {setting} | ONNX Runtime, {precision} | "
                    f"{ms(ort['end_to_end'])} | {ms(ort['loop'])} | PyTorch eager, {precision} | "
                    f"{ms(ref['end_to_end'])} | {ms(ref['loop'])} | "
                    f"{res['speedup_end_to_end']['ratio_of_medians']:.2f}x | {ort['end_to_end']['runs']} | "
                    f"{machine_cell(rec)} | {commit_words(rec)} |")
    return rows


GPU_DEFAULT = ("graph+kernels", "CUDA graph + fused kernels")
GPU_REFERENCE = ("eager", "eager torch + PyTorch step")


def gpu_rows(rec: dict[str, Any], bundled: str | None) -> list[str]:
    v = rec["variants"]
    if GPU_DEFAULT[0] not in v or GPU_REFERENCE[0] not in v:
        return []
    if min(v[name]["end_to_end"]["runs"] for name in (GPU_DEFAULT[0], GPU_REFERENCE[0])) < MIN_RUNS:
        return []  # published medians come from at least MIN_RUNS runs
    d, r = v[GPU_DEFAULT[0]], v[GPU_REFERENCE[0]]
    setting = (f"GPU, batch {rec['batch']}, {rec['steps']} steps, guidance {rec['guidance']:g}, truncation "
               f"{rec['truncation']:g}")
    precision = d["describe"]["precision"]
    speedup = r["end_to_end"]["median_ms"] / d["end_to_end"]["median_ms"]
    return [f"| {model_words(rec, bundled, rec.get('preset'))} | {setting} | {GPU_DEFAULT[1]}, {precision} | "
            f"{ms(d['end_to_end'])} | {ms(d['loop'])} | {GPU_REFERENCE[1]}, {r['describe']['precision']} | "
            f"{ms(r['end_to_end'])} | {ms(r['loop'])} | {speedup:.2f}x | {d['end_to_end']['runs']} | "
            f"{machine_cell(rec)} | {commit_words(rec)} |"]


def render_performance(root: Path = ROOT) -> str:
    bundled = bundled_sha256(root)
    cpu = load(root, RUNTIME_CPU)
    if missing_provenance(cpu):
        raise ReportError(f"{RUNTIME_CPU} lacks {missing_provenance(cpu)}; re-measure: python -m benchmarks.runtime_cpu")
    rows = cpu_rows(cpu, bundled)
    gpu_unpublished = []
    for path in sorted(root.glob(RUNTIME_GPU_GLOB)):
        rec = load(root, path.relative_to(root))
        if missing_provenance(rec):
            gpu_unpublished.append(path.name)
        else:
            rows += gpu_rows(rec, bundled)
    lines = ["One image, prompt to PIL image (\"end to end\"), and its reverse loop alone, timed in the same runs; "
             "median (p10-p90) in ms; cvqd and the reference run side by side in one process at the same precision. "
             f"Command: `{cpu['command']}` ({cpu['date'][:10]}).", "", PERF_HEADER, *rows]
    wall = cpu.get("cvqd_run_wall")
    if wall:
        lines += ["", f"The whole `cvqd-run` command for one image (process start, imports, load, generate, PNG write; "
                      f"median of {wall['onnxruntime']['runs']} runs, same record): ONNX Runtime "
                      f"{wall['onnxruntime']['median_ms'] / 1e3:.1f} s, PyTorch {wall['torch']['median_ms'] / 1e3:.1f} s."]
    if not any(r.split("|")[2].strip().startswith("GPU") for r in rows):
        lines += ["", "**GPU numbers**: none are published: no GPU record with provenance and at least "
                      f"{MIN_RUNS} runs is committed"
                      + (" (" + ", ".join(f"`benchmarks/results/{n}`" for n in gpu_unpublished) + " lack them)"
                         if gpu_unpublished else "")
                      + ". `python -m benchmarks.runtime_gpu` measures eager torch against the CUDA graph with the "
                      "fused kernels (optionally ONNX Runtime CUDA and TensorRT) on a GPU; `python -m benchmarks.report` "
                      "then adds its rows here. An earlier H100 measurement is history in "
                      "[docs/experiments.md](docs/experiments.md#gpu-runtime)."]
    return "\n".join(lines)


def mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:,.0f} MiB"


def render_install(root: Path = ROOT) -> str:
    """The installs' sizes and the whole `cvqd-run` command, runtime-only install vs the torch backend."""
    rec = load(root, SLIM)
    if missing_provenance(rec):
        raise ReportError(f"{SLIM} lacks {missing_provenance(rec)}; re-measure: python -m benchmarks.slim_runtime")
    inst, run, first = rec["install"], rec["cvqd_run"], rec["first_run_empty_cache"]
    slim, ref = run["slim"], run["torch"]
    lines = [
        f"Measured by `{rec['command']}` ({rec['date'][:10]}, commit {commit_words(rec)}, {machine_cell(rec)}).", "",
        "| install | what it runs | size |", "|---|---|---|",
        f"| `pip install cvqd` (runtime only) | plans on the CPU: ONNX Runtime + numpy, no torch | "
        f"{mib(inst['runtime']['site_packages_bytes'])} of site-packages in a fresh venv, "
        f"{mib(inst['runtime'].get('venv_tooling_bytes'))} of it the venv's own pip and setuptools "
        f"({mib(inst['estimate_runtime']['bytes'])} by the wheel estimate used below) |",
        f"| `pip install 'cvqd[gpu]'` | + the torch backend, CUDA graphs, fused kernels, ONNX Runtime CUDA | "
        f"{mib(inst['estimate_gpu']['bytes'])} (wheel estimate) |",
        f"| `pip install 'cvqd[train]'` | + training, export, evaluation | {mib(inst['estimate_train']['bytes'])} "
        f"(wheel estimate) |", "",
        "| `cvqd-run --prompt ... --out x.png`, one image, fresh process to PNG | median (p10-p90), ms | peak RSS "
        "| runs |", "|---|---|---|---|",
        f"| runtime-only install, bundled demo plan (ONNX Runtime, numpy step) | {ms(slim)} | "
        f"{slim['peak_rss_mib_median']:.0f} MiB | {slim['runs']} |",
        f"| reference: `--backend torch`, bundled demo checkpoint (PyTorch) | {ms(ref)} | "
        f"{ref['peak_rss_mib_median']:.0f} MiB | {ref['runs']} |", "",
        f"The runtime-only command is {run['speedup_ratio_of_medians']:.1f}x faster (runs interleaved in one session). "
        f"The first run on an empty cache takes {first['median_ms']:.0f} ms (median of {first['runs']}): the demo "
        f"plan ships in the package, nothing is exported or written."]
    step = root / STEP_CPU
    if step.is_file():
        srec = load(root, STEP_CPU)
        cells = []
        numpy_wins = all(r["numpy"]["median_ms"] < r["onnx-graph"]["median_ms"]
                         for r in srec["results"].values() if "onnx-graph" in r)
        for key in ("demo_B1_guidance1", "paper_B1_guidance1"):
            r = srec["results"].get(key)
            if r:
                forms = [f"{n} {r[n]['median_ms']:.2f}" for n in ("numpy", "onnx-graph", "torch") if n in r]
                cells.append(f"{key.split('_')[0]} shape (K={r['K']}, N={r['N']}): " + ", ".join(forms) + " ms")
        if cells:
            lines += ["", "The step math on the CPU is the one implementation (cvqd/model/step.py) run on numpy arrays: "
                          "per step, median of " f"{srec['runs']} (`{srec['command']}`, commit {commit_words(srec)}): "
                          + "; ".join(cells) + (". Exported to an ONNX graph it is slower at every measured shape, so "
                                                "plans do not carry one." if numpy_wins else
                                                ". At some measured shape the ONNX graph is faster: see the record.")]
    return "\n".join(lines)


def render_official(root: Path = ROOT) -> str:
    """cvqd's reverse loop against the official sampler on the same weights (benchmarks/official_cpu.py)."""
    rec = load(root, OFFICIAL_CPU)
    if missing_provenance(rec):
        raise ReportError(f"{OFFICIAL_CPU} lacks {missing_provenance(rec)}; re-measure: python -m benchmarks.official_cpu")
    lines = [f"Token sampling of a batch, same weights, conditions, guidance {rec['guidance']:g} and truncation "
             f"{rec['truncation']:g}, one process, runs interleaved; median (p10-p90) in ms. Command: "
             f"`{rec['command']}` ({rec['date'][:10]}, commit {commit_words(rec)}, {machine_cell(rec)}, "
             f"{rec['torch_threads']} torch threads).", "",
             "| model | steps | batch | official, ms | images/s | cvqd, ms | images/s | speed-up | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in rec["results"].items():
        size = "small (test config)" if key.startswith("small") else f"paper size ({r['params'] / 1e6:.0f} M, random)"
        lines.append(f"| {size} | {r['steps']} | {r['batch']} | {ms(r['official'])} | {r['official']['images_per_s']:g} "
                     f"| {ms(r['cvqd'])} | {r['cvqd']['images_per_s']:g} | {r['speedup']:.2f}x | "
                     f"{r['cvqd']['runs']} |")
    return "\n".join(lines)


# The shapes benchmark's test split, per prompt kind; targets at N = 1 (colour and shape both right)
QUALITY_GROUPS = (("full/in_distribution", "full, in-distribution", 0.90), ("full/held_out", "full, held-out pairs", 0.70),
                  ("short/in_distribution", "short, in-distribution", 0.85), ("short/held_out", "short, held-out pairs", 0.70),
                  ("short+1/in_distribution", "short + 1 attribute, in-distribution", None),
                  ("short+1/held_out", "short + 1 attribute, held-out pairs", None),
                  ("rephrased/in_distribution", "rephrased, in-distribution", None),
                  ("rephrased/held_out", "rephrased, held-out pairs", None))
SHIPPED_RECORD = Path("cvqd/assets/demo.json")
SEED_RECORDS_GLOB = "docs/results/demo_seed*.json"  # the recipe's other training seeds


def _mark(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return " (meets)" if value >= target else " (**misses**)"


def render_quality(root: Path = ROOT) -> str:
    bundled = bundled_sha256(root)
    rec = load(root, QUALITY)
    if missing_provenance(rec):
        raise ReportError(f"{QUALITY} lacks {missing_provenance(rec)}; re-measure with cvqd-eval --json")
    s = rec["settings"]
    n = s["num_candidates"]
    lines = [f"The shapes benchmark's **test split** ({s['prompts']} prompts, seeds {s['seed']}..{s['seed'] + n - 1}: "
             f"prompts and seeds no recipe or sampling decision looked at), {model_words(rec, bundled)}, {s['steps']} "
             f"steps, guidance {s['guidance']:g}, truncation {s['truncation']:g}. Command: `{rec['command']}` "
             f"({rec['date'][:10]}, {machine_words(rec['machine'])}, commit {commit_words(rec)}).", "",
             f"| prompts | N = 1: colour+shape, mean of {n} seeds ± s.e. over seeds | target | colour | shape | size "
             f"| position | best of {n} by the model's CLIP | best of {n} by the analyzer (oracle) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, label, target in QUALITY_GROUPS:
        by_n = rec["table"].get(key)
        if by_n is None:
            continue
        t, best, oracle = by_n[f"mean_of_{n}"], by_n[f"best_of_{n}"], by_n[f"oracle_of_{n}"]
        cells = ["-" if t.get(c) is None else f"{t[c]:.3f}" for c in ("colour", "shape", "size", "position")]
        lines.append(f"| {label} ({t['prompts']}) | **{t['colour+shape']:.3f}** ± {t['colour+shape_seed_se']:.3f}"
                     f"{_mark(t['colour+shape'], target)} | {'-' if target is None else f'>= {target:.2f}'} | "
                     f"{' | '.join(cells)} | {best['colour+shape']:.3f} | {oracle['colour+shape']:.3f} |")
    lines += ["", "Full: \"a small red circle on the left\"; short: \"a red circle\"; short + 1 attribute: \"a small red "
                  "circle\", \"a red circle on the left\", \"a red circle on a black background\"; rephrased: \"a photo of "
                  "...\", \"an image of ...\". Held-out pairs (purple triangle, orange square, green circle) never appear "
                  "in the generator's training images. The model's CLIP was trained on captions of every pair, the "
                  "held-out ones included, so its best-of rows favour them; the analyzer oracle is the upper bound of "
                  "any reranker."]
    rels = [SHIPPED_RECORD] + sorted(p.relative_to(root) for p in root.glob(SEED_RECORDS_GLOB))
    seeds = [(rel, load(root, rel)) for rel in rels if (root / rel).is_file()]
    if seeds:
        lines += ["", "Training seeds of the recipe (`cvqd-train demo --set seed=S`), each trained from nothing and "
                      "evaluated on the test split at its own validated guidance:", "",
                  "| record | seed | training, min | guidance (validated range) | full | short | full, held-out | "
                  "short, held-out | model | machine | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for rel, r in seeds:
            ev = (r.get("eval") or {}).get("table") or {}
            nn = ((r.get("eval") or {}).get("settings") or {}).get("num_candidates", n)
            cs = []
            for key, _, target in QUALITY_GROUPS[:4]:
                v = ev.get(key, {}).get(f"mean_of_{nn}", {}).get("colour+shape")
                cs.append("-" if v is None else f"{v:.3f}{_mark(v, target)}")
            full_in, full_held, short_in, short_held = cs
            choice = r.get("sampling_choice") or {}
            minutes = "-" if r.get("training_seconds") is None else f"{r['training_seconds'] / 60:.1f}"
            g = choice.get("guidance")
            grange = "-" if g is None else f"{g:g} ({choice['guidance_low']:g}-{choice['guidance_high']:g})"
            if r.get("note"):
                minutes += f" ({r['note']})"
            lines.append(f"| `{rel}` | {r['recipe']['seed']} | {minutes} | {grange} | {full_in} | {short_in} | "
                         f"{full_held} | {short_held} | {model_words(r, bundled)} | {machine_words(r['machine'])} | "
                         f"{commit_words(r)} |")
        first = seeds[0][1].get("sampling_choice") or {}
        if first.get("validation"):
            sweep = ", ".join(f"{g}: {v:.3f}" for g, v in first["validation"].items())
            lines += ["", f"Guidance on the validation split (seed {seeds[0][1]['recipe']['seed']}; colour+shape at "
                          f"N = 1, mean of full and short in-distribution prompts): {sweep}. The best is the default; "
                          f"the scales within {seeds[0][1]['recipe'].get('range_tolerance', 0.05):g} of it form the "
                          f"validated range, outside which cvqd-run warns."]
    return "\n".join(lines)


AR_VS_DIFFUSION = Path("benchmarks/results/ar_vs_diffusion.json")


def _settings_words(s: dict[str, Any]) -> str:
    keys = ("steps", "guidance", "truncation", "temperature", "top_k", "top_p")
    return ", ".join(f"{k.replace('_', '-')} {s[k]:g}" for k in keys if k in s)


def render_ar(root: Path = ROOT) -> str:
    rec = load(root, AR_VS_DIFFUSION)
    if missing_provenance(rec):
        raise ReportError(f"{AR_VS_DIFFUSION} lacks {missing_provenance(rec)}; re-measure with "
                          f"python -m benchmarks.ar_vs_diffusion")
    q, models = rec["quality"], rec["models"]
    n = q["ar"]["settings"]["num_candidates"]
    names = {"diffusion": "CLIP-VQDiffusion", "ar": "CLIP-GEN"}
    lines = [f"From `{AR_VS_DIFFUSION}`: `{rec['command']}` ({rec['date'][:10]}, {machine_cell(rec)}, commit "
             f"{commit_words(rec)}).", "",
             f"Both generators on the same VQGAN and CLIP (the bundled diffusion demo's), the shapes benchmark's "
             f"test split ({q['ar']['settings']['prompts']} prompts, seeds {q['ar']['settings']['seed']}.."
             f"{q['ar']['settings']['seed'] + n - 1}), each at its own validated defaults: "
             + "; ".join(f"{names[k]} `{models[k]['checkpoint']}` (`{models[k]['sha256'][:8]}`: "
                         f"{_settings_words(q[k]['settings'])})" for k in ("diffusion", "ar")) + ".", "",
             f"| prompts | {names['diffusion']}, N = 1 | {names['ar']}, N = 1 | best of {n} by CLIP: diffusion / AR "
             f"| best of {n}, oracle: diffusion / AR |", "|---|---|---|---|---|"]
    for key, group in q["ar"]["groups"].items():
        d, a = q["diffusion"]["groups"][key], group
        lines.append(f"| {a['label']} ({a['prompts']}) | {d['n1']:.3f} ± {d['n1_seed_se']:.3f} | "
                     f"{a['n1']:.3f} ± {a['n1_seed_se']:.3f} | {d[f'best_of_{n}_clip']:.3f} / "
                     f"{a[f'best_of_{n}_clip']:.3f} | {d[f'oracle_of_{n}']:.3f} / {a[f'oracle_of_{n}']:.3f} |")
    lines += ["", "N = 1: colour and shape both right, mean over the seeds ± standard error over seeds. Quality "
                  "from each model's `cvqd-eval --prompts shapes:test` report (" + ", ".join(
                      f"`{q[k]['report']}`" for k in ("diffusion", "ar")) + ").", "",
              "| model | one image, end to end, ms | token loop, ms | threads | backend |", "|---|---|---|---|---|"]
    for threads, lat in rec["latency"].items():
        for k in ("diffusion", "ar"):
            v = lat[k]
            lines.append(f"| {names[k]} ({_settings_words(v['settings'])}) | {ms(v['end_to_end'])} | "
                         f"{ms(v['loop'])} | {threads} | {v['describe']['backend']} on {v['describe']['device']} |")
    div = rec.get("diversity")
    if div:
        lines += ["", "Diversity at the defaults, " + f"{div['ar']['prompts']} prompts x {div['ar']['seeds']} seeds: "
                  + "; ".join(f"{names[k]}: {div[k]['token_difference']:.3f} of the token positions differ between "
                              f"two seeds, mean pixel difference {div[k]['pixel_difference']:.1f}/255"
                              for k in ("diffusion", "ar")) + "."]
    kv = rec["kv_cache"]
    runs = rec["latency"][next(iter(rec["latency"]))]["ar"]["end_to_end"]["runs"]
    lines += ["", f"Median (p10-p90) of {runs} interleaved runs each. KV cache: the CLIP-GEN token loop with its "
                  f"cache takes {ms(kv['cached'])} ms against {ms(kv['recompute_prefix'])} ms when every token "
                  f"recomputes its prefix (torch, fp32, {kv['threads']} thread(s)): {kv['speedup']:g}x, the same "
                  f"tokens in all {kv['tokens_equal_runs']} runs."]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[Path], str]] = {"install": render_install, "performance": render_performance,
                                             "official": render_official, "quality": render_quality,
                                             "ar": render_ar}


EXPORT_COST = {"demo": Path("benchmarks/results/export_cost_demo.json"),
               "paper": Path("benchmarks/results/export_cost_paper.json")}
EXPORT_EXPORTERS = Path("benchmarks/results/export_exporters_demo.json")
EXPORT_LATENCY = Path("benchmarks/results/export_latency_demo_fp32.json")
COMPONENTS = ("clip_text", "clip_image", "transformer", "vq_decoder")


def _source(rec: dict[str, Any], rel: Path, bundled: str | None) -> str:
    """The line under a docs table: which record, command, model, machine and commit it comes from."""
    return (f"From `{rel}`: `{rec['command']}` ({rec['date'][:10]}), {model_words(rec, bundled, rec.get('preset'))}, "
            f"{machine_cell(rec)}, commit {commit_words(rec)}.")


def _checked(root: Path, rel: Path) -> dict[str, Any]:
    rec = load(root, rel)
    if missing_provenance(rec):
        raise ReportError(f"{rel} lacks {missing_provenance(rec)}; re-measure it with its benchmark")
    return rec


def render_export_exporters(root: Path = ROOT) -> str:
    rec = _checked(root, EXPORT_EXPORTERS)
    lines = ["| component | export s (legacy / dynamo) | nodes raw | nodes after onnxslim | max rel err vs torch | "
             "ORT ms, batch 1 |", "|---|---|---|---|---|---|"]
    for c in COMPONENTS:
        lg, dy = rec["results"][c]["legacy"], rec["results"][c]["dynamo"]
        lines.append(f"| {c} | {lg['export_s']:.2f} / {dy['export_s']:.2f} | {lg['nodes']} / {dy['nodes']} | "
                     f"{lg['nodes_after_onnxslim']} / {dy['nodes_after_onnxslim']} | {lg['max_rel_err']:.1e} / "
                     f"{dy['max_rel_err']:.1e} | {lg['ort_latency_batch1']['median_ms']:.2f} / "
                     f"{dy['ort_latency_batch1']['median_ms']:.2f} |")
    return "\n".join(lines + ["", _source(rec, EXPORT_EXPORTERS, bundled_sha256(root))])


def _parity_cell(c: str, w: dict[str, float]) -> str:
    second = {"clip_text": ("min_cosine", "{:.4f}"), "clip_image": ("min_cosine", "{:.4f}"),
              "transformer": ("argmax_agreement", "{:.3f}"), "vq_decoder": ("psnr_db", "{:.0f} dB")}[c]
    return f"{w['max_rel_err']:.1e} / {second[1].format(w[second[0]])}"


def render_export_parity(root: Path = ROOT) -> str:
    lines = ["| preset, precision | clip_text rel / cos | clip_image rel / cos | transformer rel / argmax | "
             "vq_decoder rel / PSNR |", "|---|---|---|---|---|"]
    sources = []
    for preset, rel in EXPORT_COST.items():
        if not (root / rel).is_file():
            continue
        rec = _checked(root, rel)
        for precision, run in rec["runs"].items():
            if precision not in ("fp32", "fp16") or "components" not in run:
                continue
            comp = run["components"]
            lines.append(f"| {preset} {precision} | " + " | ".join(_parity_cell(c, comp[c]["parity_worst"])
                                                                   for c in COMPONENTS) + " |")
        sources.append(_source(rec, rel, bundled_sha256(root)))
    return "\n".join(lines + [""] + sources)


def render_export_cost(root: Path = ROOT) -> str:
    lines = ["| preset | precision | wall time | peak RSS | plan size | load-only baseline |", "|---|---|---|---|---|---|"]
    sources = []
    for preset, rel in EXPORT_COST.items():
        if not (root / rel).is_file():
            continue
        rec = _checked(root, rel)
        base = rec["runs"].get("load_checkpoint_only")
        first = True
        for precision, run in rec["runs"].items():
            if precision not in ("fp32", "fp16") or run.get("exit_code") != 0:
                continue
            size = run["plan_bytes"]
            size_text = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"
            baseline = f"{base['seconds']:.1f} s, {base['peak_rss_gib']:.2f} GiB" if base and first else ""
            lines.append(f"| {preset} | {precision} | {run['seconds']:.1f} s | {run['peak_rss_gib']:.2f} GiB | "
                         f"{size_text} | {baseline} |")
            first = False
        sources.append(_source(rec, rel, bundled_sha256(root)))
    return "\n".join(lines + [""] + sources)


def render_export_latency(root: Path = ROOT) -> str:
    rec = _checked(root, EXPORT_LATENCY)
    lines = ["| component | threads | PyTorch eager | ONNX Runtime | speed-up (medians) |", "|---|---|---|---|---|"]
    for threads, comps in rec["results_by_threads"].items():
        for c in COMPONENTS:
            r = comps[c]
            cell = lambda x: f"{x['median_ms']:.2f} [{x['p10_ms']:.2f}, {x['p90_ms']:.2f}]"  # noqa: E731
            lines.append(f"| {c} | {threads} | {cell(r['torch'])} | {cell(r['onnxruntime'])} | "
                         f"{r['torch']['median_ms'] / r['onnxruntime']['median_ms']:.1f}x |")
    return "\n".join(lines + ["", _source(rec, EXPORT_LATENCY, bundled_sha256(root))])


EXPORT_BLOCKS = {"export-exporters": render_export_exporters, "export-parity": render_export_parity,
                 "export-cost": render_export_cost, "export-latency": render_export_latency}
EXPORT_DOC = ROOT / "docs" / "export.md"


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- report:{name} -->\n)(.*?)(<!-- /report:{name} -->)", re.S)


def render_blocks(text: str, blocks: dict[str, Any], root: Path = ROOT, where: str = "README") -> str:
    """`text` with every report block replaced by its rendering; ReportError when a marker is missing."""
    for name, fn in blocks.items():
        pat = block_pattern(name)
        if len(pat.findall(text)) != 1:
            raise ReportError(f"{where} needs exactly one <!-- report:{name} --> ... <!-- /report:{name} --> block")
        body = fn(root)
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
    return text


def check(readme: Path = README, root: Path = ROOT, blocks: dict[str, Any] | None = None) -> str:
    """'' when the file equals its rendering, else a unified diff (file -> rendering)."""
    text = readme.read_text()
    rendered = render_blocks(text, BLOCKS if blocks is None else blocks, root, str(readme))
    if rendered == text:
        return ""
    return "".join(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True), str(readme),
                                        f"{readme} (rendered)"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", type=Path, default=README)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when the README differs from the rendering")
    mode.add_argument("--print", dest="print_", action="store_true", help="print the rendered blocks")
    args = ap.parse_args(argv)
    try:
        if args.print_:
            for name, fn in {**BLOCKS, **EXPORT_BLOCKS}.items():
                print(f"<!-- report:{name} -->\n{fn(ROOT)}\n<!-- /report:{name} -->\n")
            return 0
        files = [(args.readme, BLOCKS), (EXPORT_DOC, EXPORT_BLOCKS)]
        if args.check:
            bad = False
            for path, blocks in files:
                diff = check(path, ROOT, blocks)
                if diff:
                    sys.stderr.write(diff)
                    print(f"{path} differs from the rendering of the result JSON; run: python -m benchmarks.report",
                          file=sys.stderr)
                    bad = True
                else:
                    print(f"{path} matches the result JSON", file=sys.stderr)
            return 1 if bad else 0
        for path, blocks in files:
            text = path.read_text()
            rendered = render_blocks(text, blocks, ROOT, str(path))
            if rendered != text:
                path.write_text(rendered)
            print(f"{path}: {'rewritten' if rendered != text else 'already up to date'}", file=sys.stderr)
        return 0
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --readme that cannot be read or written
        print(f"report: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # a record without a field its table needs
        print(f"report: a result record lacks the field {exc}; re-measure it with its benchmark", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
