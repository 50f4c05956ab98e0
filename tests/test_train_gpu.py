"""The training stages on a GPU (skipped without CUDA): each runs on cuda, stops and resumes, and writes a checkpoint
that loads on the CPU. (First run on an H100 found the diffusion stage's forward process mixing the GPU schedule
tables with CPU-drawn tokens; the CPU suite cannot see such device mix-ups.)"""

import json

import pytest
import torch

from cvqd.model.checkpoint import load_checkpoint
from cvqd.training.train_clip import ClipTrainConfig, train_clip
from cvqd.training.train_diffusion import DiffusionTrainConfig, train_diffusion
from cvqd.training.train_vqgan import VQGANTrainConfig, train_vqgan

pytestmark = pytest.mark.gpu


def losses(run, key="loss"):
    return [json.loads(ln)[key] for ln in (run / "log.jsonl").read_text().splitlines() if key in json.loads(ln)]


def test_every_stage_trains_on_cuda_and_resumes(shapes_data, tmp_path):
    common = dict(quiet=True, log_every=2)
    clip = train_clip(shapes_data, tmp_path / "clip", preset="tiny", device="cuda",
                      cfg=ClipTrainConfig(steps=6, batch_size=16, **common))
    vqgan = train_vqgan(shapes_data, tmp_path / "vqgan", init=clip, device="cuda",
                        cfg=VQGANTrainConfig(steps=6, batch_size=8, sample_every=3, **common))
    dcfg = dict(batch_size=16, lr=2e-3, warmup=5, sample_every=20, sample_prompts=("a red circle",),
                cache_dir=str(tmp_path / "cache"), **common)
    diff = train_diffusion(shapes_data, tmp_path / "diffusion", init=vqgan, device="cuda",
                           cfg=DiffusionTrainConfig(steps=40, stop_after=20, **dcfg))
    assert load_checkpoint(diff).step == 20
    diff = train_diffusion(shapes_data, tmp_path / "diffusion", init=vqgan, device="cuda", resume=True,
                           cfg=DiffusionTrainConfig(steps=40, **dcfg))
    cfg = train_diffusion(shapes_data, tmp_path / "cfg", init=diff, stage="cfg", device="cuda",
                          cfg=DiffusionTrainConfig(steps=6, null_prob=0.5, **{**dcfg, "sample_every": 3}))
    for run in ("clip", "vqgan", "diffusion", "cfg"):
        assert all(torch.isfinite(torch.tensor(losses(tmp_path / run, "loss" if run != "vqgan" else "rec")))), run
    d = losses(tmp_path / "diffusion")
    assert len(d) == 20 and sum(d[-4:]) < sum(d[:4])  # 40 steps at lr 2e-3 bring the loss down
    assert (tmp_path / "diffusion" / "samples" / "step-0000040.png").is_file()
    c = load_checkpoint(cfg)  # tensors come back on the CPU
    assert c.step == 6 and c.stage == "cfg" and all(t.device.type == "cpu" for t in c.state["transformer"].values())


def test_cell_encoder_vqgan_trains_on_cuda(shapes_data, tmp_path):
    # The cell encoder's bottleneck is 1x1, where CUDA's memory-efficient attention found no kernel ("cutlassF: no
    # kernel found to launch!", first seen on an H100 with torch 2.11); AttnBlock now returns v there directly.
    run = train_vqgan(shapes_data, tmp_path / "vqgan", preset="tiny", device="cuda",
                      cfg=VQGANTrainConfig(steps=4, batch_size=8, encoder_scope="cell", quiet=True, log_every=1))
    assert load_checkpoint(run).step == 4
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "vqgan", "rec"))))
