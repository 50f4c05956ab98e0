"""cvqd-eval on a generated folder: CLIP score as a direct computation, FID through torchmetrics with weights
from a file (random Inception weights here: the statistics, not the network, are under test)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFilter

from cvqd import folder_eval as fe
from cvqd.errors import CvqdError
from cvqd.evaluation import Scorer
from cvqd.images import save_image
from cvqd.training.shapes import render, sample_spec

pytest.importorskip("torchmetrics")
pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A state dict of the FID Inception architecture with random weights (torch-fidelity's class, built without
    its download by loading nothing)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    root = tmp_path_factory.mktemp("inception")
    empty = root / "empty.pt"
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state, strict=True: None
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    for m in net.modules():  # variance-preserving init, so that 20 random layers still give varied features
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = root / "random_inception.pt"
    torch.save(net.state_dict(), path)
    return path


def _render_set(folder, seed, count, blur=0.0, prompts=False):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        spec = sample_spec(seed, i)
        im = render(spec)
        if blur:
            im = im.filter(ImageFilter.GaussianBlur(blur))
        save_image(folder / f"{i:03d}.png", im, {"prompt": spec.attrs.caption()} if prompts else None)
    return folder


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(inception_file, tmp_path):
    ref = _render_set(tmp_path / "ref", 1, 16)
    net = fe.inception_network(inception_file)
    refs = fe.image_files(ref)

    def fd(folder, cache=None):
        return fe.frechet_distance(net, fe.image_files(folder), refs, weights_id="w", size=None, cache_dir=cache)

    same = fd(_render_set(tmp_path / "same", 1, 16))["fd"]
    shifted = [fd(_render_set(tmp_path / f"blur{r}", 1, 16, blur=r))["fd"] for r in (1.0, 2.5, 6.0)]
    assert abs(same) < 1e-3 * shifted[0], (same, shifted)
    assert shifted[0] < shifted[1] < shifted[2], shifted  # the same images, blurred more and more
    cold = fd(tmp_path / "blur6.0", tmp_path / "cache")
    warm = fd(tmp_path / "blur6.0", tmp_path / "cache")
    assert not cold["reference_cached"] and warm["reference_cached"]
    assert warm["fd"] == pytest.approx(cold["fd"], rel=1e-9) == pytest.approx(shifted[2], rel=1e-9)


def test_clip_score_is_the_cosine_of_the_embeddings(tiny_ckpt, tmp_path):
    gen = _render_set(tmp_path / "gen", 3, 6, prompts=True)
    scorer = Scorer(tiny_ckpt, "cpu")
    report = fe.evaluate_folder(gen, scorer=scorer)
    files = fe.image_files(gen)
    prompts = [sample_spec(3, i).attrs.caption() for i in range(6)]
    with torch.no_grad():
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                         for f in files]) / 127.5 - 1
        img = torch.nn.functional.normalize(scorer.clip.model.encode_image(scorer.clip.preprocess(x)), dim=-1)
        txt = torch.nn.functional.normalize(scorer.clip.model.encode_text(scorer.clip.tokenize(prompts)), dim=-1)
    direct = (img * txt).sum(-1).double().numpy()
    assert report["clip_score"]["mean"] == pytest.approx(direct.mean(), abs=1e-6)
    assert report["clip_score"]["clip_score_100"] == pytest.approx(100 * np.clip(direct, 0, None).mean(), abs=1e-4)
    assert report["clip_score"]["images"] == 6


def test_bad_weights_are_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CvqdError, match="not a PyTorch weights file"):
        fe.inception_network(junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(CvqdError, match="not the FID Inception network"):
        fe.inception_network(wrong)


def test_cli_scores_a_manifest_folder(tiny_ckpt, tiny_plan, inception_file, tmp_path):
    from cvqd.eval_cli import eval_cli
    from cvqd.runtime.cli import cli

    out = tmp_path / "gen"
    r = CliRunner().invoke(cli, ["--engine", str(tiny_plan), "--prompt", "a red circle", "--prompt", "a blue square",
                                 "--num-images", "2", "--steps", "3", "--out", f"{out}/", "-q"])
    assert r.exit_code == 0, r.output
    ref = _render_set(tmp_path / "ref", 1, 6)
    js = tmp_path / "r.json"
    r = CliRunner().invoke(eval_cli, ["--ckpt", str(tiny_ckpt), "--generated", str(out), "--reference", str(ref),
                                      "--inception-weights", str(inception_file), "--fd-clip", "--image-size", "64",
                                      "--cache-dir", str(tmp_path / "c"), "--json", str(js), "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert rep["images"] == 4 and rep["clip_score"]["images"] == 4
    assert rep["fid"]["generated"] == 4 and rep["fid"]["reference"] == 6 and rep["fid"]["fd"] > 0
    assert rep["fd_clip"]["fd"] >= 0 and "model_sha256" in rep
    bad = CliRunner().invoke(eval_cli, ["--generated", str(out), "--inception-weights", str(inception_file)])
    assert bad.exit_code == 2 and "--reference" in bad.output


def test_paper_prompt_sets_from_the_users_files(tmp_path):
    from cvqd.paper_prompts import coco_prompts, ffhq_prompts, main

    src = tmp_path / "repo" / "image_synthesis" / "data" / "utils"
    src.mkdir(parents=True)
    (src / "clip2latent_text.py").write_text('# prompts\nclip2latent_text_prompt=[\n"a person with glasses",\n'
                                             '"a person smiling",\n]\nother=["x"]\n')
    assert ffhq_prompts(tmp_path / "repo") == ["a photograph of a person with glasses",
                                               "a photograph of a person smiling"]
    caps = tmp_path / "captions_val2014.json"
    caps.write_text(json.dumps({"annotations": [{"caption": f"a cat\nnumber {i}"} for i in range(50)]}))
    picked = coco_prompts(caps, count=10, seed=3)
    assert len(set(picked)) == 10 and all(p.startswith("a cat number ") for p in picked)
    assert picked == coco_prompts(caps, count=10, seed=3)
    with pytest.raises(CvqdError, match="count must be in 1..50"):
        coco_prompts(caps, count=51)
    with pytest.raises(CvqdError, match="no list clip2latent_text_prompt"):
        ffhq_prompts(caps.with_suffix(".py").write_text("x = 1\n") and caps.with_suffix(".py"))
    with pytest.raises(SystemExit) as exc:
        main(["coco", "--captions", str(tmp_path / "missing.json"), "--out", str(tmp_path / "c.txt")])
    assert exc.value.code == 2 and not (tmp_path / "c.txt").exists()
