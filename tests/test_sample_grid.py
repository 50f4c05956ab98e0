"""Training's sample grids go through the runtime's reverse loop: a prompt's cell is what `cvqd-run` draws."""

import numpy as np
from PIL import Image

from cvqd.images import read_png_params


def test_sample_grid_cell_equals_cvqd_run_with_the_same_seed(tiny_trained, shapes_data, tmp_path):
    from cvqd.cli_util import run_command
    from cvqd.runtime.cli import cli
    from cvqd.training.train_diffusion import DiffusionTrainConfig, train_diffusion

    prompt = "a red circle"
    cfg = DiffusionTrainConfig(steps=2, batch_size=8, warmup=1, sample_every=2, sample_steps=5,
                               sample_prompts=(prompt,), cache_dir=str(tiny_trained["cache"]), quiet=True)
    ckpt = train_diffusion(shapes_data, tmp_path / "run", init=tiny_trained["cfg"], stage="cfg", device="cpu", cfg=cfg)
    sheet_path = tmp_path / "run" / "samples" / "step-0000002.png"
    params = read_png_params(sheet_path)
    assert params["prompts"] == [prompt] and params["seed"] == 0 and params["steps"] == 5
    assert params["guidance"] != 1.0  # the CFG stage samples with guidance: the null rows take part

    out = tmp_path / "run.png"
    try:
        run_command(cli, "cvqd-run", ["--ckpt", str(ckpt), "--backend", "torch", "--device", "cpu", "--prompt", prompt,
                                      "--seed", "0", "--steps", "5", "--guidance", str(params["guidance"]),
                                      "--truncation", str(params["truncation"]), "--out", str(out), "-q"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    run_img = np.asarray(Image.open(out).convert("RGB"))
    h, w = run_img.shape[:2]
    sheet = np.asarray(Image.open(sheet_path).convert("RGB"))
    cell = sheet[2:2 + h, 2:2 + w]  # grid(): 2-pixel padding, the prompt's cell first
    assert np.array_equal(cell, run_img)
