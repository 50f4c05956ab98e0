"""Export time and peak memory of `cvqd-export` for a checkpoint, per precision.

    python -m benchmarks.export_cost --ckpt cvqd/assets/demo.pt --precision fp32 fp16
    cvqd-train init --preset paper --out paper.pt          # random weights are fine for the cost
    nice python -m benchmarks.export_cost --ckpt paper.pt --clip-weights random --precision fp32 fp16

Each export runs the real command (`python -m cvqd.export.cli ... --json`) in a child process; its wall time
and peak resident memory (os.wait4's ru_maxrss of that child alone) are recorded, with the per-stage
breakdown the manifest keeps (export and validation seconds per component), file sizes and parity.
As a baseline in the same run, a child that only loads the checkpoint into the model (what every export
must do first) is measured the same way. `--clip-weights random` writes a randomly initialised CLIP of the
checkpoint's architecture (for presets whose checkpoints do not carry their CLIP, e.g. paper's ViT-B/32).
Results: benchmarks/results/export_cost_<preset>.json, with the provenance record (command, commit, model
sha256, date, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import provenance, run_main, write_json

LOAD_ONLY = ("import sys; from cvqd.threads import set_torch_threads; set_torch_threads(2); "
             "from cvqd.model.clipvqd import load_model; "
             "load_model(sys.argv[1], clip_weights=sys.argv[2] if len(sys.argv) > 2 else None)")


def run_child(cmd: list[str]) -> dict:
    """Run a command; -> wall seconds, peak RSS (GiB) of that process, exit code, stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss in KiB on Linux)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"seconds": round(seconds, 2), "peak_rss_gib": round(usage.ru_maxrss / (1 << 20), 3),
                "exit_code": proc.returncode, "stdout": out.read(), "stderr_tail": err.read()[-600:]}


def random_clip_weights(ckpt: Path, out: Path) -> Path:
    import torch

    from cvqd.model.checkpoint import load_checkpoint
    from cvqd.model.clip import build_clip

    cfg = load_checkpoint(ckpt).config.clip
    torch.manual_seed(0)
    torch.save(build_clip(cfg).state_dict(), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    ap.add_argument("--clip-weights", default=None, help="a CLIP weight file, or 'random'")
    ap.add_argument("--workdir", type=Path, default=None, help="where plans are written (default: a temp dir)")
    args = ap.parse_args()

    from cvqd.model.checkpoint import load_checkpoint

    preset = load_checkpoint(args.ckpt).config.preset
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        work = Path(d)
        clip = args.clip_weights
        if clip == "random":
            clip = str(random_clip_weights(args.ckpt, work / "clip-random.pt"))
        extra = ["--clip-weights", clip] if clip else []
        runs = {"load_checkpoint_only": run_child([sys.executable, "-c", LOAD_ONLY, str(args.ckpt), *extra[1:]])}
        runs["load_checkpoint_only"].pop("stdout")
        print(f"{preset} load only: {runs['load_checkpoint_only']['seconds']} s, "
              f"{runs['load_checkpoint_only']['peak_rss_gib']} GiB", flush=True)
        for precision in args.precision:
            out = work / f"{preset}-{precision}.plan"
            r = run_child([sys.executable, "-m", "cvqd.export.cli", "--ckpt", str(args.ckpt), "--out", str(out),
                           "--precision", precision, "--json", "-q", *extra])
            stdout = r.pop("stdout")
            if r["exit_code"] == 0:
                manifest = json.loads((out / "manifest.json").read_text())
                r["summary"] = json.loads(stdout)
                r["components"] = {
                    name: {"bytes": c["onnx"]["size"] + sum(x["size"] for x in c["external_data"]),
                           "external_data": bool(c["external_data"]), "cleanup": c["cleanup"],
                           "export_seconds": c["export_seconds"], "validate_seconds": c["parity"]["seconds"],
                           "parity_worst": c["parity"]["worst"]}
                    for name, c in manifest["components"].items()}
                r["plan_bytes"] = sum(p.stat().st_size for p in out.iterdir())
            runs[precision] = r
            print(f"{preset} {precision}: exit {r['exit_code']}, {r['seconds']} s, peak RSS {r['peak_rss_gib']} GiB"
                  + (f", plan {r['plan_bytes'] / 1e9:.3f} GB" if "plan_bytes" in r else f"\n{r['stderr_tail']}"),
                  flush=True)
    payload = {**provenance(args.ckpt), "benchmark": "export_cost", "checkpoint_bytes": args.ckpt.stat().st_size,
               "preset": preset, "clip_weights": args.clip_weights, "runs": runs}
    print(f"wrote {write_json(f'export_cost_{preset}.json', payload)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.export_cost")
