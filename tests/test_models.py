"""Shapes and parameter counts of the presets; model output contracts."""

import pytest
import torch

from cvqd.model.config import preset
from cvqd.model.schedule import LOG_ZERO
from cvqd.model.clipvqd import CLIPVQDiffusion
from cvqd.model.transformer import DiffusionTransformer
from cvqd.model.clip import embedding_noise_factor, pseudo_text_embedding
from cvqd.model.vqgan import VQGAN, GumbelQuantizer, PatchDiscriminator


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_preset_parameter_count_on_meta():
    cfg = preset("paper")
    with torch.device("meta"):
        t = DiffusionTransformer(cfg.transformer)
    n = n_params(t)
    assert 505e6 < n < 525e6, n  # docs/algorithm.md#reference-configuration: about 515M
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


def test_gumbel_quantizer_without_noise_trains_on_the_argmax_codes():
    torch.manual_seed(0)
    cfg = preset("tiny").vqgan
    q = GumbelQuantizer(cfg)
    z = torch.randn(2, cfg.z_channels, 4, 4)
    z_q, _, logits = q(z, temperature=0.5, hard=True, noise_scale=0.0)
    want = q.lookup(logits.argmax(1).flatten(1), (4, 4))
    assert torch.allclose(z_q, want, atol=1e-6)
    z_q.square().sum().backward()  # straight-through: the soft relaxation carries gradients to the logits
    assert q.proj.weight.grad.abs().sum() > 0
    # noise_scale 1 is torch's own Gumbel-softmax, draw for draw
    torch.manual_seed(1)
    a = q(z, 0.5, hard=True)[0]
    torch.manual_seed(1)
    b = torch.einsum("bkhw,ke->behw", torch.nn.functional.gumbel_softmax(q.proj(z), tau=0.5, dim=1, hard=True),
                     q.embed.weight)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_cell_encoder_codes_see_only_their_own_cell(name):
    torch.manual_seed(0)
    cfg = preset(name).vqgan
    f, (h, w) = cfg.downsample, cfg.token_grid
    x = torch.rand(2, 3, cfg.resolution, cfg.resolution) * 2 - 1
    y = x.clone()
    y[:, :, f:2 * f, 2 * f:3 * f] = -0.5  # repaint the cell of token (1, 2) only
    for scope in ("image", "cell"):
        enc = VQGAN(cfg.replace(encoder_scope=scope)).eval().encoder
        with torch.no_grad():
            za, zb = enc(x), enc(y)
        assert za.shape == (2, cfg.z_channels, h, w)
        changed = (za - zb).abs().amax(dim=(0, 1)) > 0
        if scope == "cell":
            assert changed.nonzero().tolist() == [[1, 2]]
            # the same as running the encoder's layers on that cell alone
            with torch.no_grad():
                alone = enc._encode(x[:1, :, f:2 * f, 2 * f:3 * f])
            assert torch.allclose(alone[0, :, 0, 0], za[0, :, 1, 2], atol=1e-5)
        else:
            assert changed.sum() > h * w // 2  # taming's encoder: the change reaches most tokens
    with pytest.raises(Exception, match="encoder_scope"):
        cfg.replace(encoder_scope="patch")


def test_shaped_pseudo_text_noise_follows_the_image_embeddings():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 3, generator=g))[0].T  # images vary in a 3-D subspace
    embeds = torch.nn.functional.normalize(torch.randn(500, 3, generator=g) @ basis + 2 * basis[0], dim=1)
    factor = embedding_noise_factor(embeds)
    f = embeds[:8]
    pseudo = pseudo_text_embedding(f, 0.4, g, shaped=(1.0, factor))
    inside = torch.cat([basis, f])  # span of the subspace and the image embeddings themselves
    resid = pseudo - pseudo @ torch.linalg.pinv(inside) @ inside
    assert resid.norm(dim=1).max() < 1e-5
    iso = pseudo_text_embedding(f, 0.4, g)
    assert (iso - iso @ torch.linalg.pinv(inside) @ inside).norm(dim=1).min() > 0.1
    assert torch.allclose(pseudo.norm(dim=1), torch.ones(8))
    # fewer images than dimensions: the factor has fewer rows than D and still shapes the noise
    few = embeds[:20]
    small = embedding_noise_factor(few)
    assert small.shape == (20, 32)
    assert pseudo_text_embedding(few[:4], 0.4, g, shaped=(0.5, small)).shape == (4, 32)


def test_cell_encoder_bottleneck_matches_plain_convolutions(monkeypatch):
    """The 1x1-map shortcut of 3x3 convolutions (the cell encoder's last level, mid block and conv_out) gives the
    outputs and weight gradients of the convolutions it replaces."""
    import cvqd.model.vqgan as vqgan_mod

    torch.manual_seed(0)
    cfg = preset("demo").vqgan.replace(encoder_scope="cell")
    enc = VQGAN(cfg).encoder
    x = torch.rand(2, 3, cfg.resolution, cfg.resolution) * 2 - 1

    def run():
        enc.zero_grad(set_to_none=True)
        z = enc(x)
        (z * torch.linspace(-1, 1, z.numel()).reshape(z.shape)).sum().backward()
        return z.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}

    fast, fast_grads = run()
    monkeypatch.setattr(vqgan_mod, "_conv3", lambda conv, h: conv(h))
    plain, plain_grads = run()
    # float32 summation order only: max error / max magnitude below 1e-5 (measured ~3e-6)
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()
    for name, g in plain_grads.items():
        assert (fast_grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    assert plain_grads["mid.0.conv1.weight"][:, :, 0, 0].abs().sum() == 0  # off-centre taps never get gradient


def test_decoder_res_blocks_sets_the_decoder_depth():
    cfg = preset("demo").vqgan
    assert cfg.decoder_res_blocks == 1  # the demo preset's one-block decoder
    taming, one = VQGAN(cfg.replace(decoder_res_blocks=None)).decoder, VQGAN(cfg).decoder
    assert [len(level.blocks) for level in taming.levels] == [cfg.num_res_blocks + 1] * len(cfg.ch_mult)
    assert [len(level.blocks) for level in one.levels] == [1] * len(cfg.ch_mult)
    z = torch.randn(1, cfg.z_channels, *cfg.token_grid)
    assert one(z).shape == (1, 3, cfg.resolution, cfg.resolution)
    # a config written before the field existed keeps taming's decoder
    old = type(cfg).from_dict({k: v for k, v in cfg.__dict__.items() if k != "decoder_res_blocks"})
    assert old.decoder_res_blocks is None and old == cfg.replace(decoder_res_blocks=None)
    with pytest.raises(Exception, match="decoder_res_blocks"):
        cfg.replace(decoder_res_blocks=0)
