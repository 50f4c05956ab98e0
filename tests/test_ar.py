"""The autoregressive (CLIP-GEN) generator: cached decoding, sampling, training, export, runtime, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cvqd.errors import CvqdError
from cvqd.model.ar import ARTransformer
from cvqd.model.ar_loop import DROPPED, ARLoop, filter_log_probs, sample_tokens
from cvqd.model.config import ModelConfig, preset


def _scaled(cfg, seed=0, std=0.3) -> ARTransformer:
    """A tiny AR transformer with weights large enough that every position's logits differ clearly."""
    torch.manual_seed(seed)
    m = ARTransformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m


# ------------------------------------------------------------------------------------------- the model

@pytest.mark.parametrize("inplace", [False, True])
def test_cached_decoding_gives_the_full_forward_logits(inplace):
    cfg = preset("tiny-ar").ar
    m = _scaled(cfg)
    B = 3
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.num_classes, (B, cfg.seq_len), generator=g)
    cond = torch.randn(B, cfg.cond_dim, generator=g)
    with torch.no_grad():
        full = m.logits(tokens, cond)  # [B, N, K]
        logits, cache = m.prefill(cond)
        steps = [logits]
        for n in range(cfg.seq_len - 1):
            logits, out = m.decode(tokens[:, n], torch.tensor([n]), cache, inplace=inplace)
            assert (out is cache) == inplace
            cache = out
            steps.append(logits)
    cached = torch.stack(steps, 1)
    assert full.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_decode_ignores_cache_slots_after_its_position():
    cfg = preset("tiny-ar").ar
    m = _scaled(cfg)
    cond = torch.randn(2, cfg.cond_dim)
    with torch.no_grad():
        _, cache = m.prefill(cond)
        token, pos = torch.tensor([3, 5]), torch.tensor([2])
        a, _ = m.decode(token, pos, cache)
        junk = cache.clone()
        junk[:, :, :, cfg.prefix + 3:] = torch.randn_like(junk[:, :, :, cfg.prefix + 3:]) * 50
        b, _ = m.decode(token, pos, junk)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_config_round_trip_and_checks():
    cfg = preset("demo-ar")
    assert cfg.generator == "ar" and preset("demo").generator == "diffusion"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "ar" not in preset("demo").to_dict()  # diffusion configs are unchanged
    bad = cfg.to_dict()
    bad["ar"]["num_classes"] = 17
    with pytest.raises(Exception, match="ar.num_classes"):
        ModelConfig.from_dict(bad)


# ------------------------------------------------------------------------------------------- sampling

def test_filters_keep_top_k_and_the_nucleus():
    logp = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=np.float32))
    kept = lambda z: (z > DROPPED / 2).sum()  # noqa: E731
    assert kept(filter_log_probs(logp, 1.0, 2, 1.0)) == 2
    assert kept(filter_log_probs(logp, 1.0, 0, 0.6)) == 2  # 0.5 < 0.6: the second class is needed
    assert kept(filter_log_probs(logp, 1.0, 0, 0.5)) == 1
    assert kept(filter_log_probs(logp, 1.0, 0, 0.86)) == 4
    assert kept(filter_log_probs(logp, 1.0, 2, 0.7)) == 1  # top-p within the top-2: 0.5 / 0.7 = 0.71 >= 0.7
    z = filter_log_probs(logp, 0.5, 0, 1.0)  # temperature 0.5 squares and renormalises
    want = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(np.exp(z[0]), want / want.sum(), rtol=1e-5)
    noise = np.zeros_like(logp)
    noise[0, 4] = 100.0  # the noise favours a class the filter cut: it must not win
    assert sample_tokens(logp, noise, 1.0, 3, 1.0)[0] != 4
    assert sample_tokens(logp, noise, 1.0, 0, 1.0)[0] == 4
    assert sample_tokens(logp, noise, 0.0, 0, 1.0)[0] == 0  # greedy
    t = torch.from_numpy(logp)
    for args in ((1.0, 2, 1.0), (0.7, 0, 0.6), (1.3, 3, 0.9)):
        np.testing.assert_allclose(filter_log_probs(t, *args).numpy(), filter_log_probs(logp, *args), rtol=1e-6)


def test_rows_accept_a_numpy_null_with_torch_conditions():
    """ONNX Runtime on CUDA: the conditions are torch tensors, the plan's null a numpy array."""
    loop = ARLoop(None, None, 8, 4)
    rows = loop.rows(torch.ones(2, 3), np.zeros(3, dtype=np.float32), True)
    assert torch.equal(rows, torch.tensor([[1.0] * 3] * 2 + [[0.0] * 3] * 2))


def test_config_refuses_top_k_above_the_codebook():
    cfg = preset("tiny-ar")
    with pytest.raises(Exception, match="top_k"):
        cfg.replace(sampling=cfg.sampling.replace(top_k=cfg.ar.num_classes + 1))


def _loop(m):
    return ARLoop(lambda c: m.prefill(torch.as_tensor(c)), lambda t, p, c: m.decode(torch.as_tensor(t),
                                                                                  torch.as_tensor(p), c),
                  m.cfg.num_classes, m.cfg.seq_len)


def test_loop_rows_do_not_depend_on_their_batch():
    cfg = preset("tiny-ar").ar
    m = _scaled(cfg)
    cond = torch.nn.functional.normalize(torch.randn(3, cfg.cond_dim), dim=-1)
    null = torch.nn.functional.normalize(torch.randn(cfg.cond_dim), dim=0)
    loop = _loop(m)
    kw = dict(guidance=2.0, temperature=1.0, top_k=0, top_p=0.9)
    together = loop.run(cond, null, [5, 6, 7], **kw)
    alone = torch.cat([loop.run(cond[i:i + 1], null, [s], **kw) for i, s in enumerate([5, 6, 7])])
    assert torch.equal(together, alone)
    other = loop.run(cond, null, [8, 9, 10], **kw)
    assert not torch.equal(together, other)  # the seed matters
    assert together.shape == (3, cfg.seq_len) and together.dtype == torch.int64


# ------------------------------------------------------------------------- training, export, runtime

@pytest.fixture(scope="module")
def ar_run(tiny_trained, shapes_data, tmp_path_factory):
    from cvqd.training.train_ar import ARTrainConfig, train_ar

    root = tmp_path_factory.mktemp("ar")
    cfg = ARTrainConfig(steps=6, batch_size=8, warmup=2, sample_every=3, log_every=2, quiet=True, width=32,
                        depth=2, heads=2, mlp_hidden=64, prefix=2, cache_dir=str(tiny_trained["cache"]))
    ckpt = train_ar(shapes_data, root / "run", init=tiny_trained["cfg"], cfg=cfg, allow_random_clip=True,
                    device="cpu")
    return {"root": root, "ckpt": ckpt, "cfg": cfg}


def test_training_writes_an_autoregressive_checkpoint(ar_run):
    from cvqd.model.checkpoint import load_checkpoint

    ck = load_checkpoint(ar_run["ckpt"])
    assert ck.stage == "ar" and ck.step == 6 and ck.config.generator == "ar"
    assert set(ck.state) >= {"vqgan", "ar", "null_embedding"} and "transformer" not in ck.state
    assert ck.config.ar.prefix == 2 and ck.config.ar.width == 32 and ck.config.sampling.guidance_range == ()
    log = [json.loads(x) for x in (ar_run["ckpt"].parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in log)
    assert sorted(p.name for p in (ar_run["ckpt"].parent / "samples").iterdir()) == ["step-0000003.png",
                                                                                    "step-0000006.png"]


def test_training_resumes_exactly(ar_run, tiny_trained, shapes_data):
    import dataclasses

    from cvqd.model.checkpoint import load_checkpoint
    from cvqd.training.train_ar import train_ar

    out = ar_run["root"] / "resumed"
    cfg = dataclasses.replace(ar_run["cfg"], stop_after=4)
    train_ar(shapes_data, out, init=tiny_trained["cfg"], cfg=cfg, allow_random_clip=True, device="cpu")
    assert load_checkpoint(out / "model.pt").step == 4
    train_ar(shapes_data, out, init=tiny_trained["cfg"], cfg=dataclasses.replace(cfg, stop_after=None), resume=True,
             allow_random_clip=True, device="cpu")
    a, b = load_checkpoint(out / "model.pt").state["ar"], load_checkpoint(ar_run["ckpt"]).state["ar"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_training_refuses_bad_starts(ar_run, tiny_trained, shapes_data, tmp_path):
    from cvqd.training.train_ar import ARTrainConfig, train_ar

    with pytest.raises(CvqdError, match="already an autoregressive model"):
        train_ar(shapes_data, tmp_path / "x", init=ar_run["ckpt"], cfg=ar_run["cfg"], device="cpu")
    with pytest.raises(CvqdError, match="was never trained"):  # a checkpoint of `cvqd-train init`
        from cvqd.training.init import init_checkpoint

        init_checkpoint("tiny", tmp_path / "init.pt")
        train_ar(shapes_data, tmp_path / "y", init=tmp_path / "init.pt", cfg=ar_run["cfg"], device="cpu")
    with pytest.raises(CvqdError, match="divisible"):
        train_ar(shapes_data, tmp_path / "z", init=tiny_trained["cfg"], cfg=ARTrainConfig(width=30, heads=4),
                 allow_random_clip=True, device="cpu")
    assert not (tmp_path / "z").exists()


@pytest.fixture(scope="module")
def ar_plan(ar_run):
    from cvqd.export import export_plan

    return export_plan(ar_run["ckpt"], ar_run["root"] / "ar.plan")


def test_export_validates_the_kv_cache_graphs(ar_plan):
    assert set(ar_plan.components) == {"clip_text", "clip_image", "ar_prefill", "ar_decode", "vq_decoder",
                                       "vq_encoder"}
    for name in ("ar_prefill", "ar_decode"):
        parity = ar_plan.components[name].parity
        assert parity["passed"] and parity["worst"]["argmax_agreement"] == 1.0
        assert parity["worst"]["present_max_rel_err"] < 1e-4
    c = ar_plan.contracts["ar_decode"]
    assert [s.name for s in c.inputs] == ["token", "position", "past"]
    assert c.inputs[2].shape[1:] == (4, 2, ar_plan.config.ar.cache_len, 16)


@pytest.mark.parametrize("settings", [{}, {"guidance": 1.0}, {"temperature": 0.8, "top_k": 6, "top_p": 0.9},
                                      {"temperature": 0.0}])
def test_onnxruntime_and_torch_give_the_same_tokens(ar_run, ar_plan, settings):
    from cvqd.runtime.pipeline import Pipeline

    ort_pipe = Pipeline.from_plan(ar_plan, backend="onnxruntime")
    torch_pipe = Pipeline.from_checkpoint(ar_run["ckpt"])
    cond = ort_pipe.prompt_conditions(["a red circle", "a large blue square on the left"])
    seeds = [11, 12]
    a = ort_pipe.sample_tokens(cond, seeds, **ort_pipe.resolve(**settings))
    b = torch_pipe.sample_tokens(torch.from_numpy(cond), seeds, **torch_pipe.resolve(**settings))
    assert a.dtype == np.int64 and a.shape == (2, ar_plan.config.ar.seq_len)
    np.testing.assert_array_equal(a, b.numpy())


def test_images_carry_the_ar_settings(ar_plan):
    from cvqd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_plan(ar_plan)
    calls = []
    out = pipe.generate(["a red circle"], num_images=2, seed=3, top_p=0.8, callback=lambda d, t: calls.append((d, t)))
    assert [g.seed for g in out] == [3, 4]
    p = out[0].params
    assert p["top_p"] == 0.8 and p["temperature"] == 1.0 and "steps" not in p and p["preset"].endswith("-ar")
    assert calls[0] == (0, 16) and calls[-1] == (16, 16)  # one batch of two images: 16 token draws
    again = pipe.generate(["a red circle"], num_images=2, seed=3, top_p=0.8)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(out, again))
    var = pipe.variations(out[0].image, num_images=1)  # image conditions work for AR models
    assert var[0].params["mode"] == "variation"


def test_bad_requests_are_one_line_errors(ar_plan):
    from cvqd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_plan(ar_plan)
    with pytest.raises(CvqdError, match="steps is a diffusion setting"):
        pipe.generate(["a red circle"], steps=5)
    with pytest.raises(CvqdError, match="top_k must be an integer in 0..32"):
        pipe.generate(["a red circle"], top_k=33)
    with pytest.raises(CvqdError, match="top_p must be in"):
        pipe.generate(["a red circle"], top_p=0)
    with pytest.raises(CvqdError, match="temperature must be"):
        pipe.generate(["a red circle"], temperature=-1)
    with pytest.raises(CvqdError, match="token editing needs a diffusion model"):
        pipe.edit_jobs(np.zeros((16, 16, 3), dtype=np.uint8), "left", "a red circle")
    diffusion = Pipeline.from_pretrained()
    with pytest.raises(CvqdError, match="top_p is for autoregressive"):
        diffusion.generate(["a red circle"], top_p=0.5)


def test_plan_without_its_decode_graph_is_refused(ar_plan, tmp_path):
    import shutil

    from cvqd.model.plan import PlanError, load_plan

    copy = tmp_path / "broken.plan"
    shutil.copytree(ar_plan.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["components"]["ar_decode"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PlanError, match=r"lacks components \['ar_decode'\]"):
        load_plan(copy)


def test_cli_runs_an_ar_plan_and_refuses_diffusion_flags(ar_plan, tmp_path):
    base = [sys.executable, "-m", "cvqd.runtime.cli", "--engine", str(ar_plan.root), "--prompt", "a red circle"]
    out = tmp_path / "imgs"
    r = subprocess.run(base + ["--num-images", "2", "--top-k", "5", "--out", f"{out}/", "--json", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["made"] == 2 and all(i["top_k"] == 5 for i in summary["images"])
    for extra, msg in ((["--steps", "3"], "--steps is a diffusion setting"),
                       (["--truncation", "0.5"], "--truncation is a diffusion setting"),
                       (["--backend", "tensorrt"], "tensorrt backend runs diffusion plans only"),
                       (["--top-p", "1.5"], "--top-p must be in (0, 1]")):
        r = subprocess.run(base + extra + ["--out", str(tmp_path / "x.png")], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "x.png").exists()


def test_finalize_records_ar_defaults(ar_run, tmp_path):
    from cvqd.model.checkpoint import load_checkpoint
    from cvqd.training.release import finalize

    finalize(ar_run["ckpt"], tmp_path / "m.pt", fp16=True, top_p=0.85, temperature=0.9, guidance=1.5)
    s = load_checkpoint(tmp_path / "m.pt").config.sampling
    assert (s.top_p, s.temperature, s.guidance) == (0.85, 0.9, 1.5)
    with pytest.raises(CvqdError, match="diffusion defaults"):
        finalize(ar_run["ckpt"], tmp_path / "n.pt", steps=10)
    with pytest.raises(CvqdError, match="top_p must be in"):
        finalize(ar_run["ckpt"], tmp_path / "n.pt", top_p=2.0)
    assert not (tmp_path / "n.pt").exists()


# --------------------------------------------------------------------------- recipe and several processes

def test_ar_recipe_commands_parse_and_the_choice_uses_validation(tmp_path):
    import click

    from cvqd.eval_cli import eval_cli
    from cvqd.training.cli import cli as train_cli
    from cvqd.training.demo_ar import ArRecipe, ar_stages, choose_ar_sampling, recipe_with

    stages = ar_stages(ArRecipe(), tmp_path / "w", tmp_path / "ar.pt", tmp_path / "base.pt", 2, 32)
    assert [s.name for s in stages] == ["data_train", "ar", "validation", "sampling", "finalize", "eval"]
    for s in stages:
        if s.call is not None:
            continue
        argv = [a.format(guidance=1.5, guidance_low=1, guidance_high=2, top_p=0.8) for a in map(str, s.argv)]
        if "cvqd.training.cli" in argv:
            args = argv[argv.index("cvqd.training.cli") + 1:]
            train_cli.get_command(click.Context(train_cli), args[0]).make_context(args[0], args[1:])
        else:
            eval_cli.make_context("cvqd-eval", argv[argv.index("cvqd.eval_cli") + 1:])
    assert "shapes:validation" in stages[2].argv and "shapes:test" in stages[5].argv

    def row(g, p, full, short):
        return {"guidance": g, "top_p": p, "full/in_distribution/colour+shape": full,
                "short/in_distribution/colour+shape": short}

    sweep = tmp_path / "v.json"
    sweep.write_text(json.dumps({"sweep": [row(1, 0.8, 0.9, 0.9), row(2, 0.8, 0.97, 0.95), row(3, 0.8, 0.9, 0.93),
                                           row(1, 1.0, 0.99, 0.99), row(2, 1.0, 0.9, 0.8), row(3, 1.0, 0.5, 0.5)]}))
    got = choose_ar_sampling(sweep, ArRecipe())
    assert (got["guidance"], got["top_p"], got["guidance_low"], got["guidance_high"]) == (1, 1.0, 1, 1)
    got = choose_ar_sampling(sweep, recipe_with(["range_tolerance=0.2"]))
    assert (got["guidance_low"], got["guidance_high"]) == (1, 2)
    with pytest.raises(CvqdError, match="key one of"):
        recipe_with(["nope=1"])
    with pytest.raises(CvqdError, match="steps: expected int"):
        recipe_with(["steps=many"])


@pytest.mark.slow
def test_two_process_ar_run(shapes_data, tiny_trained, tmp_path):
    import os

    from cvqd.model.checkpoint import load_checkpoint

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "cvqd.training.cli", "ar", "--init", str(tiny_trained["cfg"]), "--data", str(shapes_data), "--out", str(run),
           "--steps", "4", "--batch-size", "4", "--log-every", "2", "--threads", "1", "--device", "cpu",
           "--cache-dir", str(tiny_trained["cache"]), "--sample-every", "4", "--width", "32", "--heads", "2", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = load_checkpoint(run / "model.pt")
    assert ck.stage == "ar" and ck.step == 4 and ck.training["rng"]["world"] == 2
    assert not any(k.startswith("module.") for k in ck.training["model"])
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [2, 4]
