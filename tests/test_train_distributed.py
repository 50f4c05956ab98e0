"""torchrun with 2 processes and gloo on CPU: the run completes and rank 0 alone writes one checkpoint."""

import json
import subprocess
import sys

import pytest

from cvqd.model.checkpoint import load_checkpoint


def torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cvqd.training.cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def only_files(run):
    return sorted(p.name for p in run.iterdir() if p.is_file())


@pytest.mark.slow
def test_two_process_diffusion_run_writes_one_checkpoint(shapes_data, tiny_trained, tmp_path):
    run = tmp_path / "ddp"
    torchrun("diffusion", "--init", tiny_trained["vqgan"], "--data", shapes_data, "--out", run, "--steps", 4,
             "--batch-size", 4, "--log-every", 2, "--ckpt-every", 2, "--threads", 1, "--device", "cpu",
             "--cache-dir", tiny_trained["cache"], "--sample-every", 4, "-q")
    assert only_files(run) == ["log.jsonl", "model.pt", "run.json"]  # no stray temporary files, one checkpoint
    ckpt = load_checkpoint(run / "model.pt")
    assert ckpt.step == 4 and ckpt.stage == "diffusion"
    rng = ckpt.training["rng"]
    assert rng["world"] == 2 and len(rng["ranks"]) == 2
    assert not any(k.startswith("module.") for k in ckpt.training["model"])  # DDP unwrapped before saving
    logs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 4]  # rank 0 only: no duplicated lines
    assert len(list((run / "samples").iterdir())) == 1
    # 2 ranks x batch 4 = 8 samples per step: 48 images -> 6 steps per epoch
    assert ckpt.meta["diffusion_training"]["images"] == 48


@pytest.mark.slow
def test_two_process_vqgan_with_gan_and_resume(shapes_data, tmp_path):
    run = tmp_path / "ddp-vq"
    common = ("--data", shapes_data, "--out", run, "--steps", 4, "--batch-size", 4, "--disc-start", 1,
              "--sample-every", 0, "--log-every", 1, "--threads", 1, "--device", "cpu", "-q")
    torchrun("vqgan", "--preset", "tiny", *common, "--stop-after", 2)
    assert load_checkpoint(run / "model.pt").step == 2
    torchrun("vqgan", *common, "--resume")
    ckpt = load_checkpoint(run / "model.pt")
    assert ckpt.step == 4 and only_files(run) == ["log.jsonl", "model.pt", "run.json"]
    logs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and logs[-1]["d_loss"] > 0
