"""Variations, interpolations and text diffs of the bundled model, judged by the shapes analyzer.

    python -m benchmarks.conditions_eval              # -> benchmarks/results/conditions_eval.json

- variations: every colour x shape (held-out pairs reported apart) rendered large, centred, on white; 4 variations
  each (seeds 0..3); kept = the analyzer reads the reference's colour and shape back
- interpolation: 8 frames from A to B, seeds 0..7, at the guidance (1, 1.5 or 2) that gets most short-pair
  sequences right on seeds 100..107, for the short prompts "a red square" -> "a blue circle" (the
  issue's case) and the full prompts of the same pair; reported: first frame reads A, last reads B, colour and
  shape never come back to a value they left (monotone: red, purple, blue is a smooth path), and the stricter
  count where each changes exactly once
- text diff: the rendered red circle moved from "a red circle" to "a blue circle" at strengths 0.5, 0.7, 0.9,
  seeds 0..3; reported: the colour reads blue, the shape still reads circle
- token editing (the bundled plan's VQ encoder graph): every colour x shape rendered
  large and centred, its centre region regenerated for the same shape in the next colour of the palette, seeds 0
  and 1; reported: the analyzer reads the new colour (and the shape), tokens outside the mask equal the input's,
  and the largest pixel difference to the input's reconstruction more than one token (8 px) away from the mask
- global edit: the rendered red square re-noised to strength 0.2, 0.5, 0.8, 1.0 and denoised for "a large blue
  square in the center", seeds 0..7; reported: the colour reads blue, the shape square
Everything runs on the default backend (the bundled plan, ONNX Runtime on the CPU); the JSON carries the command,
commit, model hash and machine.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from cvqd.errors import CvqdError
from benchmarks.common import load_average, provenance, run_main, write_json

PAIRS = {"short": ("a red square", "a blue circle"),
         "full": ("a large red square in the center", "a large blue circle in the center")}


def changes(seq: list) -> int:
    return sum(1 for a, b in zip(seq, seq[1:]) if a != b)


def no_back_and_forth(seq: list) -> bool:
    """No value comes back after the sequence left it (red, purple, blue is fine; square, circle, square is not)."""
    runs = [v for i, v in enumerate(seq) if i == 0 or v != seq[i - 1]]
    return len(runs) == len(set(runs))


def edit_eval(colours, shapes, Attributes, render_attributes, analyze) -> dict:
    import numpy as np

    from cvqd.runtime.pipeline import Pipeline, token_region

    pipe = Pipeline.from_pretrained()
    R, grid = pipe.config.vqgan.resolution, tuple(pipe.config.transformer.grid)
    region = token_region("center", R, grid).reshape(grid)
    cell = R // grid[0]
    far = ~np.kron(np.pad(region, 1)[:-2, 1:-1] | np.pad(region, 1)[2:, 1:-1] | np.pad(region, 1)[1:-1, :-2]
                   | np.pad(region, 1)[1:-1, 2:] | region, np.ones((cell, cell), dtype=bool))  # > 1 token away
    names = list(colours)
    recoloured = shape_kept = images = kept_tokens = 0
    worst_far, far_means = 0.0, []
    for colour, shape in itertools.product(names, shapes):
        new = names[(names.index(colour) + 1) % len(names)]
        ref = render_attributes(Attributes(colour, shape, "large", "center", "white"))
        jobs = pipe.edit_jobs(ref, "center", f"a large {new} {shape} in the center", num_images=2, seed=0)
        x0, keep = jobs["fixed"]
        recon = np.asarray(__import__("cvqd.images", fromlist=["to_pil"]).to_pil(
            pipe.backend.decode(pipe._to_backend(x0[:1])))[0], dtype=np.int16)
        for g in pipe.generate_from(**jobs):
            v = analyze(g.image)
            recoloured += v.colour == new
            shape_kept += v.shape == shape
            images += 1
            tokens = pipe.encode_tokens([g.image])[0]
            kept_tokens += int(np.array_equal(tokens[keep[0]], x0[0][keep[0]]))
            diff = np.abs(np.asarray(g.image, dtype=np.int16) - recon).max(axis=2)
            worst_far = max(worst_far, float(diff[far].max()))
            far_means.append(float(diff[far].mean()))
    return {"images": images, "new_colour": recoloured, "new_colour_rate": round(recoloured / images, 3),
            "shape_kept": shape_kept, "outside_tokens_equal_after_reencoding": kept_tokens,
            "max_pixel_diff_far_from_mask": worst_far, "mean_pixel_diff_far_from_mask":
                round(float(np.mean(far_means)), 3),
            "far_note": "pixels > 1 token from the mask, in 0..255 against the decode of the input's tokens; the "
                        "decoder's mid-block attention is global, so every pixel sees every token",
            "note": "outside tokens are held exactly during sampling (tests/test_conditions.py); re-encoding the "
                    "output image with the VQ encoder may move a token near the mask edge"}


# The interpolation guidance is chosen among these scales on these seeds (the short pair, all three criteria),
# never on the reported seeds 0..7
CHOICE_GUIDANCES = (1.0, 1.5, 2.0)
CHOICE_SEEDS = range(100, 108)


def interpolation_rows(pipe, analyze, name: str, seeds, guidance: float | None) -> list[dict]:
    """One row per seed: the 8 frames' colours and shapes and the criteria (first, last, monotone, changes once)."""
    a, b = PAIRS[name]
    (ca, sa), (cb, sb) = [(w.split()[-2], w.split()[-1]) if name == "short" else (w.split()[2], w.split()[3])
                          for w in (a, b)]
    rows = []
    for seed in seeds:
        seq = [analyze(g.image) for g in pipe.interpolate(a, b, frames=8, seed=seed, guidance=guidance)]
        colours, shapes = [v.colour for v in seq], [v.shape for v in seq]
        rows.append({"seed": seed, "colours": colours, "shapes": shapes,
                     "first_ok": colours[0] == ca and shapes[0] == sa,
                     "last_ok": colours[-1] == cb and shapes[-1] == sb,
                     "changes_once": changes(colours) == 1 and changes(shapes) == 1,
                     "monotone": no_back_and_forth(colours) and no_back_and_forth(shapes)})
    return rows


def all_three(rows: list[dict]) -> int:
    return sum(r["first_ok"] and r["last_ok"] and r["monotone"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conditions_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="conditions_eval.json")
    ap.add_argument("--interpolation-guidance", default="choose",
                    help="guidance of the interpolation sequences: 'choose' (default: the best of 1, 1.5 and 2 on "
                         "seeds 100..107, never on the reported seeds 0..7), 'default' (the model's), or a number")
    args = ap.parse_args()
    from cvqd.paths import bundled_model
    from cvqd.runtime.pipeline import Pipeline
    from cvqd.training.shapes import COLOURS, HELD_OUT, SHAPES, Attributes, analyze, render_attributes

    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained()
    report = {**provenance(bundled_model()), "benchmark": "conditions_eval", "backend": pipe.describe(),
              "settings": pipe.resolve(None, None, None)}
    var = {"in_distribution": [0, 0], "held_out": [0, 0]}
    for colour, shape in itertools.product(COLOURS, SHAPES):
        ref = render_attributes(Attributes(colour, shape, "large", "center", "white"))
        split = "held_out" if (colour, shape) in HELD_OUT else "in_distribution"
        for g in pipe.variations(ref, num_images=4, seed=0):
            v = analyze(g.image)
            var[split][0] += int(v.colour == colour and v.shape == shape)
            var[split][1] += 1
    report["variations"] = {k: {"kept": a, "images": n, "rate": round(a / n, 3)} for k, (a, n) in var.items()}
    if args.interpolation_guidance == "choose":
        tried = {f"{g:g}": all_three(interpolation_rows(pipe, analyze, "short", CHOICE_SEEDS, g))
                 for g in CHOICE_GUIDANCES}
        guidance = float(max(tried, key=lambda k: tried[k]))  # the first best scale wins a tie
        choice = {"seeds": f"{CHOICE_SEEDS[0]}..{CHOICE_SEEDS[-1]}", "all_three_of_8": tried, "chosen": guidance}
    else:
        try:
            guidance = None if args.interpolation_guidance == "default" else float(args.interpolation_guidance)
        except ValueError:
            raise CvqdError(f"--interpolation-guidance expects 'choose', 'default' or a number, got "
                            f"{args.interpolation_guidance!r}") from None
        choice = None
    interp = {}
    for name, (a, b) in PAIRS.items():
        rows = interpolation_rows(pipe, analyze, name, range(8), guidance)
        interp[name] = {"from": a, "to": b, "first_ok": sum(r["first_ok"] for r in rows),
                        "last_ok": sum(r["last_ok"] for r in rows), "monotone": sum(r["monotone"] for r in rows),
                        "changes_once": sum(r["changes_once"] for r in rows), "all_three": all_three(rows),
                        "sequences": len(rows), "rows": rows}
    report["interpolation"] = {**interp, "guidance": pipe.resolve(None, guidance, None)["guidance"],
                               "guidance_choice": choice}
    ref = render_attributes(Attributes("red", "circle", "large", "center", "white"))
    diff = {}
    for strength in (0.5, 0.7, 0.9):
        verdicts = [analyze(g.image) for g in pipe.text_diff(ref, "a red circle", "a blue circle", strength=strength,
                                                              num_images=4)]
        diff[str(strength)] = {"blue": sum(v.colour == "blue" for v in verdicts),
                               "circle": sum(v.shape == "circle" for v in verdicts), "images": len(verdicts)}
    report["text_diff"] = diff
    report["edit"] = edit_eval(COLOURS, SHAPES, Attributes, render_attributes, analyze)
    ref = render_attributes(Attributes("red", "square", "large", "center", "white"))
    report["global_edit"] = {}
    for strength in (0.2, 0.5, 0.8, 1.0):
        verdicts = [analyze(g.image) for g in pipe.edit_global(ref, "a large blue square in the center",
                                                                strength=strength, num_images=8)]
        report["global_edit"][str(strength)] = {"blue": sum(v.colour == "blue" for v in verdicts),
                                                "square": sum(v.shape == "square" for v in verdicts),
                                                "images": len(verdicts)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["load_average_end"] = load_average()
    v = report["variations"]
    print(f"variations kept: in-distribution {v['in_distribution']['rate']:.3f}, held-out {v['held_out']['rate']:.3f}; "
          + "; ".join(f"interpolation {k}: first {r['first_ok']}/8, last {r['last_ok']}/8, monotone {r['monotone']}/8"
                      for k, r in interp.items()) + "; text diff "
          + ", ".join(f"{s}: blue {d['blue']}/4" for s, d in diff.items())
          + f"; edit: new colour {report['edit']['new_colour']}/{report['edit']['images']}, far pixels max diff "
            f"{report['edit']['max_pixel_diff_far_from_mask']:.0f}", file=sys.stderr)
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.conditions_eval")
