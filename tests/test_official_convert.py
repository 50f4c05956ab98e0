"""cvqd-convert against the official implementation's own outputs (tests/fixtures/official, made by running the
official modules at a tiny config with random weights: make_fixtures.py there).

Tolerances: log-probs within 2e-4 absolute; truncation keeps the same classes; replaying the official 100-step
chain with its uniforms gives the same tokens at every step; VQ decode within 1e-4; CLIP text embeddings within
1e-5 (and the same token ids). The posteriors are compared above -69: the official code floors log-probabilities
at log(1e-30) = -69.08 where cvqd floors at -70 (a probability of 1e-30 either way).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cvqd.model import step as stepmath

FIX = Path(__file__).resolve().parent / "fixtures" / "official"


def _fixture_module():
    spec = importlib.util.spec_from_file_location("official_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The fixture files, plus the seeded CLIP written as an OpenAI-layout state dict (sha256 checked)."""
    mod = _fixture_module()
    meta = json.loads((FIX / "clip.json").read_text())
    sd = mod.seeded_clip_state([(k, s) for k, s in meta["keys"]])
    assert mod.state_sha256(sd) == meta["sha256"], "the seeded CLIP weights differ from the fixture's"
    d = tmp_path_factory.mktemp("official")
    torch.save(sd, d / "clip.pt")
    return {"config": FIX / "config.yaml", "diffusion": FIX / "diffusion.pt", "vqgan": FIX / "vqgan.ckpt",
            "vqgan_config": FIX / "taming.yaml", "clip": d / "clip.pt", "dir": d}


@pytest.fixture(scope="module")
def converted(files):
    from cvqd.model.official import convert

    model, report = convert(files["config"], files["diffusion"], files["vqgan"], files["vqgan_config"], files["clip"])
    return model, report


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIX / "outputs.npz"))


def test_config_and_defaults_come_from_the_yaml(converted):
    model, report = converted
    cfg = model.cfg
    assert (cfg.transformer.num_classes, cfg.transformer.grid, cfg.transformer.width, cfg.transformer.depth,
            cfg.transformer.heads, cfg.transformer.mlp_hidden) == (32, (4, 4), 32, 2, 2, 64)
    s = cfg.sampling
    assert (s.steps, s.guidance, s.truncation, s.best_of, s.normalize_null) == (100, 3.0, 0.85, 2, False)
    assert report["diffusion_part"] == "state dict" and cfg.clip.model_cfg["quick_gelu"] is True
    # the raw null embedding, as the official inference uses it (not unit length)
    assert abs(float(model.null_condition().detach().norm()) - report["null_norm"]) < 1e-6
    assert report["null_norm"] > 2


def test_normalize_null_switch(files):
    from cvqd.model.official import convert

    model, report = convert(files["config"], files["diffusion"], files["vqgan"], files["vqgan_config"],
                            files["clip"], normalize_null=True)
    assert model.cfg.sampling.normalize_null is True and report["normalize_null"] is True
    assert abs(float(model.null_condition().detach().norm()) - 1) < 1e-6


def test_transformer_log_probs(converted, ref):
    model, _ = converted
    with torch.no_grad():
        got = model.transformer(torch.from_numpy(ref["lp_tokens"]), torch.from_numpy(ref["lp_t"]),
                                torch.from_numpy(ref["lp_cond"])).numpy()
    assert got.shape == ref["lp_out"].shape
    assert np.abs(got - ref["lp_out"]).max() <= 2e-4


def _guided_truncated(model, x_t: np.ndarray, t: int, cond: np.ndarray, guidance: float, rate: float) -> np.ndarray:
    """cvqd's step stages on the converted model: [B, K, N] guided, truncated log p(x_0)."""
    B = x_t.shape[0]
    null = model.null_condition().detach().numpy()
    rows = np.concatenate([cond, np.broadcast_to(null, cond.shape)]).astype(np.float32)
    tokens = np.concatenate([x_t, x_t])
    with torch.no_grad():
        logits = model.transformer.logits(torch.from_numpy(tokens), torch.full((2 * B,), t),
                                          torch.from_numpy(rows)).numpy()
    log_x0 = stepmath.guide_logits(logits, B, guidance, use_null=True)
    return stepmath.truncate_threshold(log_x0, rate)


def test_guidance_truncation_and_posterior_at_recorded_steps(converted, ref):
    model, _ = converted
    K = model.cfg.transformer.num_classes
    steps = list(ref["chain_t"])
    for j, t in enumerate(ref["chain_record_t"]):
        i = steps.index(t)
        x_t = ref["chain_x_t"][i]
        ours = _guided_truncated(model, x_t, int(t), ref["chain_cond"], 3.0, 0.85)
        theirs = ref["chain_log_x0"][j][:, :K]
        assert np.abs(ours - theirs).max() <= 2e-4, t
        assert np.array_equal(ours > -69.9, theirs > -69.9), t  # the same classes survive truncation
        post = stepmath.posterior(ours, x_t, model.schedule.host_terms(int(t), int(t) - 1))
        official = ref["chain_posterior"][j]
        clip = lambda a: np.maximum(a, -69.0)  # noqa: E731
        assert np.abs(clip(post[:, :K]) - clip(official[:, :K])).max() <= 2e-4, t
        # the [MASK] row where x_t is [MASK]; where x_t is a real token the official row holds its floor arithmetic
        # (log 1e-30 plus terms, about -47..-70: a probability below 1e-20) and cvqd's -70
        masked = x_t == K
        if masked.any():
            assert np.abs(clip(post[:, K])[masked] - clip(official[:, K])[masked]).max() <= 2e-4, t
        assert (official[:, K][~masked] < -40).all() and (post[:, K][~masked] <= -69.9).all()


def test_replaying_the_official_chain_gives_its_tokens(converted, ref):
    """All 100 steps, fed the official uniforms: free running from all-[MASK], every step's tokens equal."""
    model, _ = converted
    K = model.cfg.transformer.num_classes
    x = np.full_like(ref["chain_x_t"][0], K)
    for i, t in enumerate(ref["chain_t"]):
        assert np.array_equal(x, ref["chain_x_t"][i]), f"tokens differ entering step t={t}"
        log_x0 = _guided_truncated(model, x, int(t), ref["chain_cond"], 3.0, 0.85)
        post = stepmath.posterior(log_x0, x, model.schedule.host_terms(int(t), int(t) - 1))
        u = ref["chain_uniform"][i]
        noise = -np.log(-np.log(u + 1e-30) + 1e-30)  # the official Gumbel transform
        x = stepmath.gumbel_argmax(post, noise)
    assert np.array_equal(x, ref["chain_tokens"])


def test_vq_decode_and_encode(converted, ref):
    model, _ = converted
    with torch.no_grad():
        img = model.vqgan.decode(torch.from_numpy(ref["vq_tokens"])).clamp(-1, 1).numpy()
        codes = model.vqgan.encode(torch.from_numpy(ref["vq_in"])).reshape(2, -1).numpy()
    assert np.abs(img - ref["vq_images"]).max() <= 1e-4
    assert np.array_equal(codes, ref["vq_codes"])  # quant_conv folded into the projection: the same argmax


def test_clip_ids_and_text_embeddings(converted, ref):
    from cvqd.model.bpe import ClipBPE

    model, _ = converted
    prompts = json.loads((FIX / "prompts.json").read_text())
    ids = ClipBPE.from_open_clip()(prompts)
    assert np.array_equal(ids, ref["clip_ids"])
    emb = model.encode_prompts(prompts).numpy()
    assert np.abs(emb - ref["clip_text"]).max() <= 1e-5


def test_training_checkpoint_uses_its_ema(files):
    from cvqd.model.official import load_diffusion_file

    sd, part = load_diffusion_file(FIX / "last.pth")
    bare = torch.load(FIX / "diffusion.pt", weights_only=True)
    assert part == "ema" and all(torch.equal(sd[k], bare[k]) for k in bare)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cvqd.convert_cli", *map(str, args)], capture_output=True, text=True)


def test_cli_converts_exports_and_runs(files, tmp_path):
    out = tmp_path / "official.pt"
    base = ["--config", files["config"], "--vqgan", files["vqgan"], "--vqgan-config", files["vqgan_config"],
            "--clip", files["clip"]]
    proc = _cli(*base, "--diffusion", FIX / "last.pth", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "from its ema" in proc.stderr and "best of 2" in proc.stderr
    plan = tmp_path / "official.plan"
    proc = subprocess.run([sys.executable, "-m", "cvqd.export.cli", "--ckpt", str(out), "--out", str(plan), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    img = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-m", "cvqd.runtime.cli", "--engine", str(plan), "--prompt", "a red circle",
                           "--steps", "10", "--out", str(img)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from cvqd.images import read_image_params

    params = read_image_params(img)
    assert params["guidance"] == 3.0 and params["truncation"] == 0.85 and params["best_of"] == 2  # its defaults


@pytest.mark.parametrize("swap,needle", [
    ({"--diffusion": "vqgan"}, "is a VQGAN (Lightning) checkpoint, not a diffusion file"),
    ({"--vqgan": "diffusion"}, "is a diffusion transformer, not a VQGAN"),
    ({"--diffusion": "truncated"}, "damaged or truncated"),
    ({"--config": "wider_mlp"}, "the config does not match the weights"),
    ({"--config": "deeper"}, "missing tensor 'transformer.blocks.2."),
    ({"--clip": "diffusion"}, "not an OpenAI ViT CLIP state dict"),
])
def test_bad_inputs_one_line_no_output(files, tmp_path, swap, needle):
    paths = {"--config": files["config"], "--diffusion": FIX / "diffusion.pt", "--vqgan": files["vqgan"],
             "--vqgan-config": files["vqgan_config"], "--clip": files["clip"]}
    others = {"vqgan": files["vqgan"], "diffusion": FIX / "diffusion.pt"}
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes((FIX / "diffusion.pt").read_bytes()[:50_000])
    others["truncated"] = trunc
    for name, old, new in (("wider_mlp", "mlp_hidden_times: 2", "mlp_hidden_times: 4"),
                           ("deeper", "n_layer: 2", "n_layer: 3")):
        others[name] = tmp_path / f"{name}.yaml"
        text = files["config"].read_text()
        assert old in text
        others[name].write_text(text.replace(old, new))
    for flag, name in swap.items():
        paths[flag] = others[name]
    out = tmp_path / "out.pt"
    proc = _cli(*[x for kv in paths.items() for x in kv], "--out", out)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and needle in err[0], proc.stderr
    assert not out.exists()
