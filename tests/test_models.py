"""Shapes and parameter counts of the presets; model output contracts."""

import pytest
import torch

from cvqd.config import preset
from cvqd.runtime.schedule import LOG_ZERO
from cvqd.training.model import CLIPVQDiffusion
from cvqd.training.transformer import DiffusionTransformer
from cvqd.training.vqgan import VQGAN, PatchDiscriminator


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_preset_parameter_count_on_meta():
    cfg = preset("paper")
    with torch.device("meta"):
        t = DiffusionTransformer(cfg.transformer)
    n = n_params(t)
    assert 505e6 < n < 525e6, n  # SPEC §2: about 515M
    assert cfg.transformer.seq_len == 256 and cfg.vqgan.token_grid == (16, 16) and cfg.vqgan.n_embed == 4096
    assert cfg.transformer.depth == 24 and cfg.transformer.width == 512 and cfg.transformer.heads == 16
    assert cfg.clip.model_name == "ViT-B-32" and cfg.clip.embed_dim == 512 and cfg.diffusion.num_steps == 100


def test_paper_transformer_shapes_on_meta():
    cfg = preset("paper")
    with torch.device("meta"):
        t = DiffusionTransformer(cfg.transformer)
        out = t(torch.zeros(2, 256, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2, 512))
    assert out.shape == (2, 4097, 256)


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_preset_forward_shapes(name):
    cfg = preset(name)
    torch.manual_seed(0)
    t = DiffusionTransformer(cfg.transformer).eval()
    B, N, K = 2, cfg.transformer.seq_len, cfg.transformer.num_classes
    tokens = torch.randint(0, K + 1, (B, N))
    out = t(tokens, torch.tensor([0, cfg.diffusion.num_steps - 1]), torch.randn(B, cfg.clip.embed_dim))
    assert out.shape == (B, K + 1, N)
    torch.testing.assert_close(out[:, :K].exp().sum(1), torch.ones(B, N))
    assert (out[:, K] == LOG_ZERO).all() and out.max() <= 0 and out.min() >= LOG_ZERO
    v = VQGAN(cfg.vqgan).eval()
    R = cfg.vqgan.resolution
    images = torch.rand(B, 3, R, R) * 2 - 1
    codes = v.encode(images)
    assert codes.shape == (B, N) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < K
    assert v.decode(codes).shape == (B, 3, R, R)
    recon, kl, logits = v.train()(images, temperature=0.9)
    assert recon.shape == images.shape and kl.ndim == 0 and logits.shape == (B, K, *cfg.vqgan.token_grid)
    assert PatchDiscriminator(cfg.vqgan)(images).ndim == 4


def test_linear_mlp_option_and_clip_projection():
    cfg = preset("tiny")
    tc = cfg.transformer.replace(mlp="linear", cond_dim=48)
    t = DiffusionTransformer(tc)
    out = t(torch.zeros(1, tc.seq_len, dtype=torch.long), torch.tensor([3]), torch.randn(1, 48))
    assert out.shape == (1, tc.num_classes + 1, tc.seq_len)


def test_condition_changes_prediction():
    cfg = preset("tiny")
    torch.manual_seed(0)
    t = DiffusionTransformer(cfg.transformer)
    tok = torch.full((1, cfg.transformer.seq_len), cfg.transformer.num_classes)
    a = t(tok, torch.tensor([5]), torch.randn(1, 32))
    b = t(tok, torch.tensor([5]), torch.randn(1, 32))
    c = t(tok, torch.tensor([9]), torch.randn(1, 32))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_bundle_text_embeddings_normalised_and_null():
    torch.manual_seed(0)
    m = CLIPVQDiffusion(preset("tiny")).eval()
    e = m.encode_prompts(["a red circle", "a blue square"])
    assert e.shape == (2, 32)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(m.null_condition().norm(), torch.tensor(1.0))
