"""cvqd against the official CLIP-VQDiffusion sampler on the same weights, side by side in one process (CPU).

    pip install einops                                    # the official modules need it
    python -m benchmarks.official_cpu --official-repo PATH/TO/CLIPVQDiffusion

PATH is a checkout of the authors' repository; its modules are imported from there for this run only (a stand-in
`pytorch_lightning` module, `Tensor.cuda` a no-op on the CPU); nothing of them enters the package.

For each model size (small: the test fixtures' config; paper: 24 layers, width 512, 16 x 16 tokens, K = 4096)
the official DiffusionTransformer is built with random weights, and cvqd's model is converted from its state dict
(cvqd.model.official.transformer_state: the same weights). Both then sample token grids for the same conditions
with the coco config's guidance (3) and truncation r = 0.85:
  official  generate_content's path (guidance in cf_predict_start with two sequential forwards, the "top{r}r"
            truncation wrapper, p_sample: q_posterior + Gumbel-max), with the VQ decode stubbed out
  cvqd      the reverse loop (cvqd/model/loop.py) with the converted transformer (torch, fp32; the two guidance
            rows in one batched forward) and the numpy step
Timed: the reverse sampling of a batch (tokens; the VQ decoder is the same network on both sides and is left out),
runs interleaved, medians with spread; images/s = batch / median. The small model runs its 100 steps; the paper
model runs --paper-steps steps (the official loop runs steps T-1..0 of a schedule shortened to that many steps; cvqd
the strided schedule), so its numbers are per that many steps. The JSON (benchmarks/results/official_cpu.json)
carries the command, commit, machine and load.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

from benchmarks.common import load_average, positive_int, provenance, run_main, summary, write_json

SIZES = {
    "small": dict(K=32, grid=4, width=32, depth=2, heads=2, mlp_times=2),
    "paper": dict(K=4096, grid=16, width=512, depth=24, heads=16, mlp_times=4),
}
GUIDANCE, TRUNCATION = 3.0, 0.85


def setup_official(root: Path) -> None:
    import torch

    if not (root / "image_synthesis").is_dir():
        raise SystemExit(f"official_cpu: {root} has no image_synthesis/ folder: not a CLIPVQDiffusion checkout")
    sys.path.insert(0, str(root))
    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = torch.nn.Module
    sys.modules.setdefault("pytorch_lightning", pl)
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official transformer's forward calls t.cuda()
    try:
        import einops  # noqa: F401
    except ImportError:
        raise SystemExit("official_cpu: the official modules need einops: pip install einops") from None


def official_model(size: dict, seed: int):
    import torch

    from image_synthesis.modeling.transformers.diffusion_transformer import DiffusionTransformer

    g, K, W = size["grid"], size["K"], size["width"]
    base = "image_synthesis.modeling."
    net = DiffusionTransformer(
        diffusion_step=100, alpha_init_type="alpha1", auxiliary_loss_weight=5e-4, adaptive_auxiliary_loss=True,
        mask_weight=[1, 1], learnable_cf=True, cf_drop_prob=0.1,
        transformer_config={"target": base + "transformers.transformer_utils.Condition2ImageTransformer",
                            "params": {"class_type": "adalayerclip", "attn_type": "selfcondition",
                                       "n_layer": size["depth"], "n_embd": W, "n_head": size["heads"],
                                       "content_seq_len": g * g, "content_spatial_size": [g, g], "attn_pdrop": 0.0,
                                       "resid_pdrop": 0.0, "block_activate": "GELU2",
                                       "timestep_type": "adalayernorm", "mlp_hidden_times": size["mlp_times"],
                                       "mlp_type": "conv_mlp"}},
        content_emb_config={"target": base + "embeddings.dalle_mask_image_embedding.DalleMaskImageEmbedding",
                            "params": {"num_embed": K, "spatial_size": (g, g), "embed_dim": W, "trainable": True,
                                       "pos_emb_type": "embedding"}}).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        net.empty_text_embed = torch.nn.Parameter(torch.randn(1, W, generator=gen))
    return net


def official_sampler(net, cond, steps: int):
    """A callable running the official generate_content path for `cond` [B, D] -> tokens [B, N]."""
    import torch

    from image_synthesis.modeling.models.clip_vqdiffusion import CLIPVQDiffusion

    class CondCodec(torch.nn.Module):
        def encode_text(self, tokens):
            return cond

    class ContentCodec(torch.nn.Module):
        def decode(self, tokens):
            return tokens

    wrap = CLIPVQDiffusion.__new__(CLIPVQDiffusion)
    torch.nn.Module.__init__(wrap)
    wrap.transformer, wrap.condition_codec, wrap.content_codec = net, CondCodec(), ContentCodec()
    wrap.learnable_cf, wrap.guidance_scale, wrap.condition_info_valid = True, GUIDANCE, {"key": "text"}
    if steps != net.num_timesteps:  # a shortened loop for timing (per-step cost is what it measures)
        net.num_timesteps = steps
    batch = {"text": {"token": torch.zeros(cond.shape[0], 77, dtype=torch.long)}}

    def run():
        return wrap.generate_content(batch=batch, filter_ratio=0, replicate=1, content_ratio=1,
                                     sample_type=f"top{TRUNCATION}r")["content"]

    return run


def cvqd_sampler(net, size: dict, cond, steps: int):
    import torch

    from cvqd.model.config import DiffusionConfig, ModelConfig, TransformerConfig
    from cvqd.model.loop import ReverseLoop
    from cvqd.model.official import transformer_state
    from cvqd.model.schedule import MaskReplaceSchedule
    from cvqd.model.transformer import DiffusionTransformer

    g, K, W = size["grid"], size["K"], size["width"]
    tcfg = TransformerConfig(num_classes=K, grid=(g, g), width=W, depth=size["depth"], heads=size["heads"],
                             mlp="conv", mlp_hidden=size["mlp_times"] * W, cond_dim=W, num_steps=100)
    cfg = ModelConfig.__new__(ModelConfig)  # only the parts transformer_state reads
    cfg.transformer, cfg.diffusion = tcfg, DiffusionConfig(num_steps=100)
    state, null = transformer_state(net.state_dict(), cfg, "official weights")
    model = DiffusionTransformer(tcfg).eval()
    model.load_state_dict(state)
    loop = ReverseLoop(model.logits, MaskReplaceSchedule(K, 100), g * g, "cpu")
    seeds = list(range(cond.shape[0]))

    def run():
        with torch.no_grad():
            return loop.run(cond, null.detach(), seeds, steps=steps, guidance=GUIDANCE, truncation=TRUNCATION)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.official_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-repo", type=Path, required=True, help="a CLIPVQDiffusion checkout")
    ap.add_argument("--runs", type=positive_int, default=10, help="timed runs per sampler and setting")
    ap.add_argument("--paper-runs", type=positive_int, default=5)
    ap.add_argument("--paper-steps", type=positive_int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--out", default="official_cpu.json")
    args = ap.parse_args()
    setup_official(args.official_repo)
    import torch

    from cvqd.machine import git_state

    report = {**provenance(None), "benchmark": "official_cpu", "guidance": GUIDANCE, "truncation": TRUNCATION,
              "official_repo_commit": git_state(args.official_repo).get("commit"), "torch_threads":
                  torch.get_num_threads(), "results": {}}
    for name, size in SIZES.items():
        steps = 100 if name == "small" else args.paper_steps
        runs = args.runs if name == "small" else args.paper_runs
        net = official_model(size, seed=1)
        for B in args.batch:
            cond = torch.nn.functional.normalize(torch.randn(B, size["width"], generator=torch.Generator()
                                                             .manual_seed(B)), dim=-1)
            samplers = {"official": official_sampler(net, cond, steps), "cvqd": cvqd_sampler(net, size, cond, steps)}
            for fn in samplers.values():  # warm-up
                fn()
            times = {k: [] for k in samplers}
            for i in range(runs):
                for k in (list(samplers) if i % 2 == 0 else list(samplers)[::-1]):
                    t = time.perf_counter()
                    samplers[k]()
                    times[k].append((time.perf_counter() - t) * 1e3)
            res = {"steps": steps, "batch": B, "params": sum(p.numel() for p in net.transformer.parameters()),
                   **{k: {**summary(v), "images_per_s": round(B / (np.median(v) / 1e3), 3)} for k, v in times.items()}}
            res["speedup"] = round(res["official"]["median_ms"] / res["cvqd"]["median_ms"], 2)
            report["results"][f"{name}_B{B}"] = res
            print(f"{name} B={B} {steps} steps: official {res['official']['median_ms']:.0f} ms, cvqd "
                  f"{res['cvqd']['median_ms']:.0f} ms: {res['speedup']:.2f}x", file=sys.stderr, flush=True)
        del net
    report["load_average_end"] = load_average()
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.official_cpu")
