"""Training stages on `tiny`: a few steps reduce each loss, resume equals running straight through,
finalize strips the resume state."""

import json

import pytest
import torch

from cvqd.model.checkpoint import load_checkpoint
from cvqd.model.config import preset
from cvqd.training.data import ImageSet, to_float
from cvqd.training.losses import diffusion_loss
from cvqd.model.clipvqd import CLIPVQDiffusion, load_model
from cvqd.training.train_clip import ClipTrainConfig, contrastive_loss, train_clip
from cvqd.training.train_diffusion import DiffusionTrainConfig, train_diffusion
from cvqd.training.train_vqgan import VQGANTrainConfig, reconstruction_report, train_vqgan
from cvqd.model.transformer import DiffusionTransformer


def log_lines(run):
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]


def assert_same_tree(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def assert_resume_exact(straight, resumed) -> None:
    """Same weights, optimizer, EMA, sampler and RNG states; same logged losses."""
    a, b = load_checkpoint(straight / "model.pt"), load_checkpoint(resumed / "model.pt")
    assert a.step == b.step
    assert_same_tree(a.state, b.state, "state")
    tr_a = {k: v for k, v in a.training.items() if k != "config"}
    tr_b = {k: v for k, v in b.training.items() if k != "config"}
    assert_same_tree(tr_a, tr_b, "training")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in rows]  # noqa: E731
    assert strip(log_lines(straight)) == strip(log_lines(resumed))


# ------------------------------------------------------------------------------------------------ VQGAN

def test_vqgan_steps_reduce_reconstruction_error(shapes_data, tmp_path):
    images = ImageSet.scan(shapes_data, 16).preload().images
    torch.manual_seed(0)
    before = reconstruction_report(CLIPVQDiffusion(preset("tiny"), build_clip_model=False), images)
    cfg = VQGANTrainConfig(steps=40, batch_size=8, base_lr=1e-4, disc_start=10_000, log_every=10, sample_every=20,
                           quiet=True)
    ckpt = train_vqgan(shapes_data, tmp_path / "run", preset="tiny", cfg=cfg, device="cpu")
    after = reconstruction_report(load_model(ckpt), images)
    assert after["l1"] < 0.7 * before["l1"], (before, after)
    logs = log_lines(tmp_path / "run")
    # (the held-out l1 above is the decrease check: single-window logged losses are too noisy to order)
    assert all(0 < row["rec"] < 10 for row in logs)
    assert 0 < logs[-1]["codes_alive"] <= 32 and logs[-1]["temperature"] < 0.02
    assert (tmp_path / "run" / "samples" / "step-0000020.png").is_file()
    meta = load_checkpoint(ckpt).meta["vqgan_training"]
    assert meta["steps"] == 40 and meta["images"] == 48


def test_vqgan_with_gan_resumes_exactly(shapes_data, tmp_path):
    # (with the Gumbel noise annealed to 0, so the non-standard sampling path resumes exactly too)
    cfg = dict(steps=6, batch_size=4, disc_start=2, log_every=1, sample_every=0, noise_final=0.0, quiet=True)
    train_vqgan(shapes_data, tmp_path / "a", preset="tiny", cfg=VQGANTrainConfig(**cfg), device="cpu")
    train_vqgan(shapes_data, tmp_path / "b", preset="tiny", cfg=VQGANTrainConfig(**cfg, stop_after=3), device="cpu")
    assert load_checkpoint(tmp_path / "b" / "model.pt").step == 3
    train_vqgan(shapes_data, tmp_path / "b", cfg=VQGANTrainConfig(**cfg), resume=True, device="cpu")
    assert_resume_exact(tmp_path / "a", tmp_path / "b")
    logs = log_lines(tmp_path / "a")
    assert logs[-1]["d_loss"] > 0  # the discriminator was on
    assert logs[0]["noise"] > 0.9 and logs[-1]["noise"] < 0.1


def test_vqgan_decoder_only_keeps_the_tokens_and_lowers_the_argmax_reconstruction_error(shapes_data, tmp_path):
    from cvqd.errors import CvqdError

    images = ImageSet.scan(shapes_data, 16).preload().images
    base_cfg = dict(batch_size=8, base_lr=1e-4, disc_start=10_000, log_every=10, sample_every=0, quiet=True)
    base = train_vqgan(shapes_data, tmp_path / "base", preset="tiny", device="cpu",
                       cfg=VQGANTrainConfig(steps=20, **base_cfg))
    ft = train_vqgan(shapes_data, tmp_path / "ft", init=base, device="cpu",
                     cfg=VQGANTrainConfig(steps=30, decoder_only=True, **base_cfg))
    a, b = load_checkpoint(base), load_checkpoint(ft)
    for name, t in a.state["vqgan"].items():  # encoder and codebook untouched, decoder trained
        same = torch.equal(t, b.state["vqgan"][name])
        assert same == (not name.startswith(("decoder.", "post_quant_conv."))), name
    m_a, m_b = load_model(a), load_model(b)
    with torch.no_grad():
        x = to_float(images)
        assert torch.equal(m_a.vqgan.encode(x), m_b.vqgan.encode(x))
    before, after = reconstruction_report(m_a, images), reconstruction_report(m_b, images)
    assert after["l1"] < 0.9 * before["l1"], (before, after)
    assert b.meta["vqgan_training"]["steps"] == 20 and b.meta["vqgan_decoder_training"]["steps"] == 30
    with pytest.raises(CvqdError, match="decoder of a trained VQGAN"):
        train_vqgan(shapes_data, tmp_path / "fresh", preset="tiny", device="cpu",
                    cfg=VQGANTrainConfig(steps=2, decoder_only=True, **base_cfg))


def test_vqgan_cell_encoder_trains_and_is_kept_by_its_checkpoint(shapes_data, tmp_path):
    from cvqd.errors import CvqdError

    cfg = dict(batch_size=8, base_lr=1e-4, disc_start=10_000, log_every=10, sample_every=0, quiet=True)
    images = ImageSet.scan(shapes_data, 16).preload().images
    ckpt = train_vqgan(shapes_data, tmp_path / "cell", preset="tiny", device="cpu",
                       cfg=VQGANTrainConfig(steps=30, encoder_scope="cell", **cfg))
    model = load_model(ckpt)
    assert model.cfg.vqgan.encoder_scope == "cell"
    torch.manual_seed(0)
    before = reconstruction_report(CLIPVQDiffusion(preset("tiny").replace(
        vqgan=preset("tiny").vqgan.replace(encoder_scope="cell")), build_clip_model=False), images)
    # (a cell of `tiny` is 4x4 pixels, so this tokenizer learns slowly; the check is that the whole path trains)
    assert reconstruction_report(model, images)["l1"] < before["l1"]
    # continuing it: the same scope may be restated (and the encoder keeps learning), another one is refused
    more = train_vqgan(shapes_data, tmp_path / "more", init=ckpt, device="cpu",
                       cfg=VQGANTrainConfig(steps=2, encoder_scope="cell", **cfg))
    assert not torch.equal(model.vqgan.encoder.conv_in.weight, load_model(more).vqgan.encoder.conv_in.weight)
    with pytest.raises(CvqdError, match="encoder_scope='cell', not 'image'"):
        train_vqgan(shapes_data, tmp_path / "other", init=ckpt, device="cpu",
                    cfg=VQGANTrainConfig(steps=2, encoder_scope="image", **cfg))


# ------------------------------------------------------------------------------------------------- CLIP

def _clip_loss(model, images, captions):
    clip = model.require_clip()
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.model.encode_image(clip.preprocess(to_float(images))), dim=-1)
        txt = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenize(captions)), dim=-1)
        ids = torch.tensor([sorted(set(captions)).index(c) for c in captions])
        return float(contrastive_loss(img, txt, clip.model.logit_scale.exp(), ids)[0])


def test_clip_steps_reduce_contrastive_loss_and_resume_exactly(shapes_data, tmp_path):
    ims = ImageSet.scan(shapes_data, 16)
    ims.preload()
    caps = [f.with_suffix(".txt").read_text().splitlines()[0] for f in ims.files]
    cfg = dict(steps=30, batch_size=16, lr=3e-3, warmup=3, log_every=5, quiet=True)
    torch.manual_seed(0)
    before = _clip_loss(CLIPVQDiffusion(preset("tiny")), ims.images, caps)
    a = train_clip(shapes_data, tmp_path / "a", preset="tiny", cfg=ClipTrainConfig(**cfg), device="cpu")
    assert _clip_loss(load_model(a), ims.images, caps) < before - 0.2
    train_clip(shapes_data, tmp_path / "b", preset="tiny", cfg=ClipTrainConfig(**cfg, stop_after=17), device="cpu")
    train_clip(shapes_data, tmp_path / "b", cfg=ClipTrainConfig(**cfg), resume=True, device="cpu")
    assert_resume_exact(tmp_path / "a", tmp_path / "b")
    assert load_checkpoint(a).stage == "clip"


# -------------------------------------------------------------------------------------------- diffusion

def _fixed_loss(model, transformer, tokens, embeds):
    """The training loss on fixed x_0, t, x_t and conditions (no randomness)."""
    g = torch.Generator().manual_seed(0)
    T = model.cfg.diffusion.num_steps
    t = torch.arange(len(tokens)) % T
    x_t = model.schedule.q_sample(tokens, t, g)
    pt = torch.full((len(tokens),), 1.0 / T)
    with torch.no_grad():
        log_x0 = transformer(x_t, t, embeds)[:, : model.cfg.transformer.num_classes]
        return float(diffusion_loss(log_x0, tokens, x_t, t, pt, model.schedule, model.cfg.diffusion)[0])


def test_diffusion_steps_reduce_loss(shapes_data, tiny_trained, tmp_path):
    cfg = DiffusionTrainConfig(steps=60, batch_size=16, lr=2e-3, warmup=5, log_every=10, sample_every=30,
                               sample_prompts=("a red circle",), cache_dir=str(tiny_trained["cache"]), quiet=True)
    ckpt = train_diffusion(shapes_data, tmp_path / "run", init=tiny_trained["vqgan"], cfg=cfg, device="cpu")
    model = load_model(ckpt)
    ims = ImageSet.scan(shapes_data, 16).preload().images
    with torch.no_grad():
        tokens = model.vqgan.encode(to_float(ims))
        embeds = model.require_clip().encode_image(to_float(ims))
    torch.manual_seed(0)
    fresh = DiffusionTransformer(model.cfg.transformer).eval()
    trained = DiffusionTransformer(model.cfg.transformer).eval()
    trained.load_state_dict({k.removeprefix("transformer."): v for k, v in
                             load_checkpoint(ckpt).training["model"].items()})
    assert _fixed_loss(model, trained, tokens, embeds) < 0.8 * _fixed_loss(model, fresh, tokens, embeds)
    assert (tmp_path / "run" / "samples" / "step-0000030.png").is_file()
    c = load_checkpoint(ckpt)
    assert c.stage == "diffusion" and "vqgan_training" in c.meta and "diffusion_training" in c.meta
    # the checkpoint's inference weights are the EMA, not the raw weights
    assert not torch.equal(c.state["transformer"]["head.weight"], c.training["model"]["transformer.head.weight"])


@pytest.mark.parametrize("stage", ["diffusion", "cfg"])
def test_diffusion_and_cfg_resume_exactly(shapes_data, tiny_trained, tmp_path, stage):
    init = tiny_trained["vqgan"] if stage == "diffusion" else tiny_trained["diffusion"]
    cfg = dict(steps=6, batch_size=8, warmup=2, log_every=1, sample_every=0, null_prob=0.5, noise_shaped=0.5,
               cache_dir=str(tiny_trained["cache"]), quiet=True)
    train_diffusion(shapes_data, tmp_path / "a", init=init, stage=stage, cfg=DiffusionTrainConfig(**cfg), device="cpu")
    train_diffusion(shapes_data, tmp_path / "b", init=init, stage=stage,
                    cfg=DiffusionTrainConfig(**cfg, stop_after=2), device="cpu")
    train_diffusion(shapes_data, tmp_path / "b", init=init, stage=stage, cfg=DiffusionTrainConfig(**cfg),
                    resume=True, device="cpu")
    assert_resume_exact(tmp_path / "a", tmp_path / "b")


def test_aux_weight_goes_into_the_checkpoint_and_the_cfg_stage_keeps_it(shapes_data, tiny_trained, tmp_path):
    from cvqd.errors import CvqdError

    cfg = dict(steps=1, batch_size=8, sample_every=0, cache_dir=str(tiny_trained["cache"]), quiet=True)
    base = train_diffusion(shapes_data, tmp_path / "a", init=tiny_trained["vqgan"],
                           cfg=DiffusionTrainConfig(**cfg, aux_weight=0.05), device="cpu")
    assert load_checkpoint(tiny_trained["vqgan"]).config.diffusion.aux_weight == 5e-4
    assert load_checkpoint(base).config.diffusion.aux_weight == 0.05
    tuned = train_diffusion(shapes_data, tmp_path / "b", init=base, stage="cfg", cfg=DiffusionTrainConfig(**cfg),
                            device="cpu")
    assert load_checkpoint(tuned).config.diffusion.aux_weight == 0.05
    with pytest.raises(CvqdError, match="aux_weight must be >= 0"):
        train_diffusion(shapes_data, tmp_path / "c", init=tiny_trained["vqgan"],
                        cfg=DiffusionTrainConfig(**cfg, aux_weight=-1.0), device="cpu")


def test_depth_builds_a_shallower_transformer_that_the_cfg_stage_and_loader_keep(shapes_data, tiny_trained, tmp_path):
    from cvqd.errors import CvqdError

    cfg = dict(steps=1, batch_size=8, sample_every=0, cache_dir=str(tiny_trained["cache"]), quiet=True)
    preset_depth = load_checkpoint(tiny_trained["vqgan"]).config.transformer.depth
    base = train_diffusion(shapes_data, tmp_path / "a", init=tiny_trained["vqgan"],
                           cfg=DiffusionTrainConfig(**cfg, depth=1), device="cpu")
    assert preset_depth != 1 and load_checkpoint(base).config.transformer.depth == 1
    tuned = train_diffusion(shapes_data, tmp_path / "b", init=base, stage="cfg", cfg=DiffusionTrainConfig(**cfg),
                            device="cpu")
    model = load_model(tuned)
    assert model.cfg.transformer.depth == 1 and len(model.transformer.blocks) == 1
    with pytest.raises(CvqdError, match="--depth belongs to the base stage"):
        train_diffusion(shapes_data, tmp_path / "c", init=base, stage="cfg", cfg=DiffusionTrainConfig(**cfg, depth=2),
                        device="cpu")
    with pytest.raises(CvqdError, match="depth must be >= 1"):
        DiffusionTrainConfig(depth=0)


def test_final_lr_ratio_sets_where_the_decay_ends(shapes_data, tiny_trained, tmp_path):
    import json

    from cvqd.errors import CvqdError
    from cvqd.training.common import lr_at

    assert lr_at(1000, 1e-3, 100, 1000, "cosine", 0.7) == pytest.approx(7e-4)
    assert lr_at(1000, 1e-3, 100, 1000, "cosine") == pytest.approx(1e-4)
    cfg = dict(steps=3, batch_size=8, warmup=0, lr=1e-3, sample_every=0, log_every=1,
               cache_dir=str(tiny_trained["cache"]), quiet=True)
    run = train_diffusion(shapes_data, tmp_path / "a", init=tiny_trained["vqgan"],
                          cfg=DiffusionTrainConfig(**cfg, final_lr_ratio=0.7), device="cpu").parent
    lrs = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(lr_at(2, 1e-3, 0, 3, "cosine", 0.7)) and min(lrs) > 0.7e-3
    for bad, match in (({"final_lr_ratio": 0.0}, "final_lr_ratio"), ({"final_lr_ratio": 1.5}, "final_lr_ratio"),
                       ({"schedule": "linear"}, "schedule")):
        with pytest.raises(CvqdError, match=match):
            DiffusionTrainConfig(**bad)


def test_cfg_stage_learns_the_null_embedding(tiny_trained):
    base, cfg = load_checkpoint(tiny_trained["diffusion"]), load_checkpoint(tiny_trained["cfg"])
    assert cfg.stage == "cfg" and cfg.config.clip.null_prob == 0.1
    assert not torch.equal(base.state["null_embedding"], cfg.state["null_embedding"])
    assert torch.equal(base.state["vqgan"]["decoder.conv_out.weight"], cfg.state["vqgan"]["decoder.conv_out.weight"])
    assert "null" in cfg.training["model"] and "null" not in base.training["model"]


def test_feature_cache_is_reused_without_decoding(shapes_data, tiny_trained, tmp_path, monkeypatch):
    import cvqd.training.data as data

    def no_decoding(*a, **k):
        raise AssertionError("images were decoded although their features are cached")

    monkeypatch.setattr(data, "load_image", no_decoding)
    cfg = DiffusionTrainConfig(steps=1, batch_size=8, sample_every=0, cache_dir=str(tiny_trained["cache"]), quiet=True)
    train_diffusion(shapes_data, tmp_path / "run", init=tiny_trained["vqgan"], cfg=cfg, device="cpu")


def test_refuses_to_overwrite_a_run_and_checks_stages(shapes_data, tiny_trained, tmp_path):
    from cvqd.errors import CvqdError

    cfg = DiffusionTrainConfig(steps=1, batch_size=8, sample_every=0, cache_dir=str(tiny_trained["cache"]), quiet=True)
    with pytest.raises(CvqdError, match="already holds a run"):
        train_diffusion(shapes_data, tiny_trained["diffusion"].parent, init=tiny_trained["vqgan"], cfg=cfg)
    with pytest.raises(CvqdError, match="VQGAN was never trained"):
        train_diffusion(shapes_data, tmp_path / "x", init=tiny_trained["clip"], cfg=cfg)
    with pytest.raises(CvqdError, match="continues from a base"):
        train_diffusion(shapes_data, tmp_path / "y", init=tiny_trained["vqgan"], stage="cfg", cfg=cfg)
    with pytest.raises(CvqdError, match="no checkpoint"):
        train_diffusion(shapes_data, tmp_path / "z", init=tiny_trained["vqgan"], cfg=cfg, resume=True)


def test_diffusion_refuses_a_random_clip_unless_asked(shapes_data, tiny_trained, tiny_ckpt, tmp_path):
    """A CLIP no checkpoint records an origin for (`cvqd-train init`, a --preset start) is random: the diffusion and
    CFG stages refuse it with a one-line error naming the ways out, and condition on it with --allow-random-clip."""
    from test_train_data import invoke, one_line_error

    from cvqd.errors import CvqdError

    vqgan = train_vqgan(shapes_data, tmp_path / "vq", preset="tiny", device="cpu",  # no `cvqd-train clip` before it
                        cfg=VQGANTrainConfig(steps=1, batch_size=8, sample_every=0, quiet=True))
    assert load_checkpoint(vqgan).meta["clip_random"] is True
    assert load_checkpoint(tiny_ckpt).meta["clip_random"] is True
    cfg = DiffusionTrainConfig(steps=1, batch_size=8, sample_every=0, cache_dir=str(tiny_trained["cache"]), quiet=True)
    with pytest.raises(CvqdError, match="CLIP was never trained.*--clip-from.*--allow-random-clip"):
        train_diffusion(shapes_data, tmp_path / "a", init=vqgan, cfg=cfg, device="cpu")
    with pytest.raises(CvqdError, match="--clip-from .* CLIP was never trained"):
        train_diffusion(shapes_data, tmp_path / "b", init=vqgan, clip_from=tiny_ckpt, cfg=cfg, device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    one_line_error(*invoke("diffusion", "--init", vqgan, "--data", shapes_data, "--out", tmp_path / "c",
                           "--cache-dir", tiny_trained["cache"], "-q"), "never trained", "--allow-random-clip")
    # a trained CLIP from another checkpoint: its record comes along, the random mark goes
    ok = load_checkpoint(train_diffusion(shapes_data, tmp_path / "d", init=vqgan, clip_from=tiny_trained["clip"],
                                         cfg=cfg, device="cpu"))
    assert ok.meta["clip_training"] == load_checkpoint(tiny_trained["clip"]).meta["clip_training"]
    assert "clip_random" not in ok.meta
    # asked for: it trains and says so, and the CFG stage on top asks again
    rnd = train_diffusion(shapes_data, tmp_path / "e", init=vqgan, allow_random_clip=True, cfg=cfg, device="cpu")
    assert load_checkpoint(rnd).meta["clip_random"] is True
    with pytest.raises(CvqdError, match="never trained.*--allow-random-clip"):
        train_diffusion(shapes_data, tmp_path / "f", init=rnd, stage="cfg", cfg=cfg, device="cpu")
    code, err = invoke("cfg", "--init", rnd, "--data", shapes_data, "--out", tmp_path / "g", "--steps", 1,
                       "--batch-size", 8, "--sample-every", 0, "--cache-dir", tiny_trained["cache"],
                       "--allow-random-clip", "-q")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "g" / "model.pt").meta["clip_random"] is True


def test_finalize_strips_resume_state_and_records_defaults(tiny_trained, tmp_path):
    from cvqd.training.release import finalize

    out = tmp_path / "final.pt"
    size = finalize(tiny_trained["cfg"], out, fp16=True, steps=8, guidance=2.5, truncation=0.8, notes={"k": "v"})
    c = load_checkpoint(out)
    assert c.training is None and c.meta["weights_dtype"] == "float16" and c.meta["k"] == "v"
    assert (c.config.sampling.steps, c.config.sampling.guidance, c.config.sampling.truncation) == (8, 2.5, 0.8)
    assert size < tiny_trained["cfg"].stat().st_size / 2
    src = load_model(tiny_trained["cfg"])
    torch.testing.assert_close(load_model(out).transformer.head.weight, src.transformer.head.weight, atol=1e-3, rtol=1e-3)


def test_finalize_swaps_in_a_decoder_only_when_the_tokens_stay_the_same(shapes_data, tiny_trained, tmp_path):
    """A decoder fine-tuned (--decoder-only) from the tokenizer the generator learned replaces the model's decoder;
    a VQGAN with another encoder is refused (its tokens are not the generator's), through the CLI too."""
    from test_train_data import invoke, one_line_error

    from cvqd.errors import CvqdError
    from cvqd.training.release import finalize

    donor = train_vqgan(shapes_data, tmp_path / "dec", init=tiny_trained["vqgan"], device="cpu",
                        cfg=VQGANTrainConfig(steps=4, batch_size=8, decoder_only=True, sample_every=0, quiet=True))
    finalize(tiny_trained["cfg"], tmp_path / "final.pt", fp16=True, vqgan_from=donor)
    out, gen, dec = (load_checkpoint(p) for p in (tmp_path / "final.pt", tiny_trained["cfg"], donor))
    for name, t in out.state["vqgan"].items():
        want = (dec if name.startswith(("decoder.", "post_quant_conv.")) else gen).state["vqgan"][name]
        assert torch.equal(t, want.half().float()), name
    assert any(not torch.equal(gen.state["vqgan"][k], dec.state["vqgan"][k]) for k in dec.state["vqgan"]
               if k.startswith("decoder."))
    assert_same_tree(out.state["transformer"], {k: v.half().float() for k, v in gen.state["transformer"].items()})
    assert out.meta["vqgan_decoder_from"] == str(donor) and out.meta["vqgan_decoder_training"]["steps"] == 4
    # the fp16 model it made accepts the same donor again (compared at fp16 precision)
    finalize(tmp_path / "final.pt", tmp_path / "again.pt", vqgan_from=donor)
    with pytest.raises(CvqdError, match="encoder/codebook differ"):
        finalize(tiny_trained["cfg"], tmp_path / "bad.pt", vqgan_from=tiny_trained["clip"])
    one_line_error(*invoke("finalize", "--ckpt", tiny_trained["cfg"], "--out", tmp_path / "bad.pt",
                           "--vqgan-from", tiny_trained["clip"]), "encoder/codebook differ")
    assert not (tmp_path / "bad.pt").exists()


def test_reconstruction_attributes_separate_a_trained_tokenizer_from_an_untrained_one():
    """The tokenizer's ceiling on the shapes benchmark (docs/experiments.md): the bundled model's VQGAN keeps colour
    and shape of most rendered images (0.98 measured on these 120), a random one almost none (0.06)."""
    from cvqd.errors import CvqdError
    from cvqd.paths import bundled_model
    from cvqd.training.train_vqgan import reconstruction_attributes

    trained = reconstruction_attributes(load_model(bundled_model()), count=120)
    torch.manual_seed(0)
    untrained = reconstruction_attributes(CLIPVQDiffusion(preset("demo"), build_clip_model=False), count=120)
    assert trained["images"] == 120 and trained["colour+shape"] >= 0.9 and untrained["colour+shape"] <= 0.3
    assert trained["colour+shape"] <= min(trained["colour"], trained["shape"])
    with pytest.raises(CvqdError, match="64x64"):
        reconstruction_attributes(CLIPVQDiffusion(preset("tiny"), build_clip_model=False), count=4)
