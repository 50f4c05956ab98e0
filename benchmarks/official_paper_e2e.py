"""A paper-size official model, end to end: official-format files -> cvqd-convert -> cvqd-export -> cvqd-run.

    pip install einops
    python -m benchmarks.official_paper_e2e --official-repo PATH/TO/CLIPVQDiffusion

The released models cannot be downloaded here, so this makes files of the same formats and sizes with random
weights, using the official modules (imported from PATH for this run only): the coco configuration's
DiffusionTransformer (24 layers, width 512, 16 x 16 tokens, K = 4096: 515 M parameters) saved as a bare state
dict like clipvq_coco.pt, the taming Gumbel VQGAN of taming_f16_4096_coco.yaml (256 px, 74 M) saved as a Lightning
checkpoint, and OpenAI's ViT-B/32 architecture (151 M) saved as a state dict. Then the command-line tools run on
them as a user would: `cvqd-convert` (timed), `cvqd-export` of the converted checkpoint (timed), `cvqd-run` on the
plan (ONNX Runtime, a few steps, one image) and on the checkpoint (`--backend torch`), and the images are checked
(256 x 256, the official sampling defaults in their parameters). The record goes to
benchmarks/results/official_paper_e2e.json with the commands, timings and the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average, provenance, run_main, write_json
from benchmarks.official_cpu import SIZES, official_model, setup_official

COCO_CONFIG = "configs/coco_finetune.yaml"
COCO_TAMING = "OUTPUT/pretrained_model/taming_dvae/taming_f16_4096_coco.yaml"
VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


def official_files(root: Path, work: Path) -> dict[str, Path]:
    import torch

    from cvqd.model.official import read_yaml
    from image_synthesis.modeling.modules.clip.model import CLIP
    from image_synthesis.taming.modules.diffusionmodules.model import Decoder, Encoder
    from image_synthesis.taming.modules.vqvae.quantize import GumbelQuantize

    net = official_model(SIZES["paper"], seed=5)
    torch.save(net.state_dict(), work / "clipvq_coco.pt")
    del net
    p = read_yaml(root / COCO_TAMING, "taming config")["model"]["params"]
    dd = {k: v for k, v in p["ddconfig"].items()}
    vq = torch.nn.Module()
    vq.encoder, vq.decoder = Encoder(**dd), Decoder(**dd)
    vq.quantize = GumbelQuantize(dd["z_channels"], p["embed_dim"], n_embed=p["n_embed"])
    vq.quant_conv = torch.nn.Conv2d(dd["z_channels"], p["embed_dim"], 1)
    vq.post_quant_conv = torch.nn.Conv2d(p["embed_dim"], dd["z_channels"], 1)
    torch.save({"epoch": 99, "state_dict": vq.state_dict()}, work / "coco_vqgan.ckpt")
    del vq
    clip = CLIP(**VIT_B_32)
    torch.save(clip.state_dict(), work / "ViT-B-32.pt")
    return {"config": root / COCO_CONFIG, "diffusion": work / "clipvq_coco.pt", "vqgan": work / "coco_vqgan.ckpt",
            "vqgan_config": root / COCO_TAMING, "clip": work / "ViT-B-32.pt"}


def timed_run(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"official_paper_e2e: {' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return round(time.perf_counter() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.official_paper_e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-repo", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3, help="reverse steps of the generated images")
    ap.add_argument("--out", default="official_paper_e2e.json")
    args = ap.parse_args()
    setup_official(args.official_repo)
    from cvqd.images import read_image_params
    from PIL import Image

    report = {**provenance(None), "benchmark": "official_paper_e2e", "steps": args.steps, "seconds": {}}
    work = Path(tempfile.mkdtemp(prefix="cvqd-official-"))
    try:
        t = time.perf_counter()
        files = official_files(args.official_repo, work)
        report["seconds"]["make_official_files"] = round(time.perf_counter() - t, 1)
        report["file_bytes"] = {k: v.stat().st_size for k, v in files.items()}
        ckpt, plan = work / "coco.pt", work / "coco.plan"
        py = sys.executable
        convert = [py, "-m", "cvqd.convert_cli", "--config", files["config"], "--diffusion", files["diffusion"],
                   "--vqgan", files["vqgan"], "--vqgan-config", files["vqgan_config"], "--clip", files["clip"],
                   "--out", ckpt, "--json"]
        report["seconds"]["cvqd-convert"] = timed_run([str(c) for c in convert])
        report["seconds"]["cvqd-export"] = timed_run([py, "-m", "cvqd.export.cli", "--ckpt", str(ckpt), "--out",
                                                      str(plan), "-q"])
        images = {}
        for name, extra in (("plan_onnxruntime", ["--engine", str(plan)]),
                            ("checkpoint_torch", ["--ckpt", str(ckpt), "--backend", "torch", "--device", "cpu"])):
            img = work / f"{name}.png"
            report["seconds"][f"cvqd-run {name}"] = timed_run(
                [py, "-m", "cvqd.runtime.cli", *extra, "--prompt", "a bowl of fruit on a wooden table", "--steps",
                 str(args.steps), "--best-of", "1", "--seed", "3", "--out", str(img), "-q"])
            params = read_image_params(img)
            images[name] = {"size": list(Image.open(img).size), "guidance": params["guidance"],
                            "truncation": params["truncation"], "steps": params["steps"]}
        report["images"] = images
        ok = all(v["size"] == [256, 256] and v["guidance"] == 3.0 and v["truncation"] == 0.85
                 for v in images.values())
        report["images_ok"] = ok
        if not ok:
            raise SystemExit(f"official_paper_e2e: unexpected images {json.dumps(images)}")
        print(f"official paper size end to end: {json.dumps(report['seconds'])}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = load_average()
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.official_paper_e2e")
