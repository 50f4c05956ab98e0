"""Per-step CPU cost of the demo recipe's tokenizer and CLIP stages, each variant beside its reference.

    python -m benchmarks.train_step_cpu                 # one thread, as the recipe runs each stage
    python -m benchmarks.train_step_cpu --threads 2 --repeats 15

What is timed: one full training step (forward, backward, optimizer) on random inputs of the recipe's batch
sizes, so the numbers are the stage's cost per step without data loading:
- VQGAN (demo preset, cell encoder, straight-through Gumbel codes, batch 8):
  - `plain`: the reference, the encoder's 3x3 convolutions run as convolutions on the 1x1 maps of the cell
    encoder's bottleneck;
  - `shortcut`: what training runs, those convolutions as the matrix products of their centre taps
    (`cvqd/model/vqgan.py::_conv3`; same outputs and gradients, tests/test_models.py);
  - `1-block decoder`: `decoder_res_blocks=1`, one ResNet block per decoder level (the preset) instead of taming's
    num_res_blocks + 1 = 2.
- CLIP (demo preset's open_clip config, batch 256, symmetric InfoNCE): vision towers of width 96 and 64 (the
  preset), 3 or 2 layers, 8x8 patches.
Variants are interleaved (round robin) so that drift in the machine's load hits them alike; medians with the
p10-p90 spread are reported. The hardware's limit: FLOPs per step (torch's FlopCounterMode) against an estimated
FP32 peak of FMA lanes per cycle x 2 x clock x threads (`--fma-lanes`, by default from the CPU flags: 32 with
AVX-512, 16 with AVX2 and FMA; cores with two 128-bit FMA pipes such as AMD Zen 1 need `--fma-lanes 8`).
Results: benchmarks/results/train_step_cpu.json.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import load_average, positive_int, provenance, run_main, summary, write_json
from cvqd.threads import set_torch_threads


def fma_lanes_from_flags() -> int:
    """FP32 FMA lanes per cycle guessed from /proc/cpuinfo: 32 (two AVX-512 pipes), 16 (two AVX2 pipes), else 8."""
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        return 8
    return 32 if "avx512f" in flags else 16 if {"avx2", "fma"} <= flags else 8


def _clock_ghz() -> float | None:
    try:
        mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())]
        return round(max(mhz) / 1000, 3) if mhz else None
    except OSError:
        return None


def vqgan_step(decoder_res_blocks: int | None, plain: bool) -> Callable[[], None]:
    """-> one training step of the demo VQGAN (`plain`: the reference convolutions on 1x1 maps)."""
    import torch

    import cvqd.model.vqgan as vqgan_mod
    from cvqd.model.config import preset

    cfg = preset("demo").vqgan.replace(encoder_scope="cell", decoder_res_blocks=decoder_res_blocks)
    torch.manual_seed(0)
    vq = vqgan_mod.VQGAN(cfg).train()
    opt = torch.optim.Adam(vq.parameters(), lr=8e-4, betas=(0.5, 0.9))
    x = torch.rand(8, 3, cfg.resolution, cfg.resolution) * 2 - 1
    fast = vqgan_mod._conv3

    def step() -> None:
        vqgan_mod._conv3 = (lambda conv, h: conv(h)) if plain else fast
        try:
            z_q, kl, _ = vq.quantize(vq.encoder(x), 0.5, hard=True)
            r = vq.decoder(vq.post_quant_conv(z_q))
            loss = (x - r).abs().mean() + (x - r).square().mean() + kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            vqgan_mod._conv3 = fast

    return step


def clip_step(width: int, layers: int) -> Callable[[], None]:
    """-> one training step of the demo CLIP with this vision tower."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from cvqd.model.config import preset

    cfg = preset("demo").clip.model_cfg
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "width": width, "layers": layers}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = torch.randn(256, 3, 64, 64)
    tokens = torch.randint(1, 1000, (256, cfg["text_cfg"]["context_length"]))
    target = torch.arange(256)

    def step() -> None:
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = img @ txt.t() * 10
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def flops(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the recipe runs each stage on one)")
    ap.add_argument("--repeats", type=positive_int, default=20, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--fma-lanes", type=int, default=None,
                    help="FP32 FMA lanes per core per cycle, for the peak (default from the CPU flags: 32 with "
                         "AVX-512, 16 with AVX2+FMA; pass 8 for cores with two 128-bit FMA pipes, e.g. AMD Zen 1)")
    ap.add_argument("--out", default="train_step_cpu.json")
    a = ap.parse_args()
    if a.fma_lanes is None:
        a.fma_lanes = fma_lanes_from_flags()
    set_torch_threads(a.threads)
    groups: dict[str, dict[str, Any]] = {
        "vqgan": {"reference": "plain, 2-block decoder", "variants": {
            "plain, 2-block decoder": vqgan_step(None, plain=True),
            "shortcut, 2-block decoder": vqgan_step(None, plain=False),
            "shortcut, 1-block decoder (the preset)": vqgan_step(1, plain=False)}},
        "clip": {"reference": "width 96, 3 layers", "variants": {
            "width 96, 3 layers": clip_step(96, 3),
            "width 64, 3 layers (the preset)": clip_step(64, 3),
            "width 96, 2 layers": clip_step(96, 2),
            "width 64, 2 layers": clip_step(64, 2)}},
    }
    ghz = _clock_ghz()
    peak = a.fma_lanes * 2 * ghz * a.threads if ghz else None  # GFLOP/s
    result: dict[str, Any] = {**provenance(None), "benchmark": "train_step_cpu",
                              "weights": "random init of the demo preset (seed 0)", "threads": a.threads, "clock_ghz": ghz,
                              "peak_gflops_estimate": peak, "fma_lanes": a.fma_lanes, "groups": {}}
    for name, g in groups.items():
        steps = g["variants"]
        counts = {k: flops(s) for k, s in steps.items()}
        for s in steps.values():  # warm-up
            s()
            s()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(a.repeats):
            for k, s in steps.items():
                t0 = time.perf_counter()
                s()
                times[k].append((time.perf_counter() - t0) * 1e3)
        ref = summary(times[g["reference"]])["median_ms"]
        rows = {}
        for k in steps:
            st = summary(times[k])
            gflops = counts[k] / st["median_ms"] / 1e6
            rows[k] = {**st, "gflop_per_step": round(counts[k] / 1e9, 3), "achieved_gflops": round(gflops, 2),
                       "share_of_peak": round(gflops / peak, 3) if peak else None,
                       "speedup_vs_reference": round(ref / st["median_ms"], 3)}
            print(f"{name:6s} {k:34s} median {st['median_ms']:8.1f} ms (p10 {st['p10_ms']:.1f}, p90 {st['p90_ms']:.1f})"
                  f"  {counts[k] / 1e9:6.2f} GFLOP  {gflops:5.1f} GFLOP/s  x{ref / st['median_ms']:.2f}", flush=True)
        result["groups"][name] = {"reference": g["reference"], "rows": rows}
    result["load_average_end"] = load_average()
    print(f"wrote {write_json(a.out, result)}")


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.train_step_cpu")
