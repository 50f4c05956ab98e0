"""The real CUDA kernel source, run on the CPU through kernels/emulation.h, against its PyTorch references.

No GPU is needed: kernels/sampling.cu is compiled as C++20 with CUDA's thread/block/warp model emulated by
fibers (kernels/emulate.py). This checks the kernels' logic (indexing, reductions, bisection, Philox, ties,
in-place update, the loop's device-side step path); GPU behaviour itself is covered by the gpu-marked tests.
"""

import pytest
import torch

from cvqd.kernels.emulate import EmulationUnavailable, compiler
from cvqd.kernels.parity import failures, parity_report

try:
    compiler()
except EmulationUnavailable as exc:  # pragma: no cover - the CI image has g++
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("emulation")


@pytest.mark.parametrize("K,N,threads", [
    (32, 4, None),     # tiny: one warp, one class group per thread
    (30, 4, None),     # K not a multiple of 4: the [MASK] class shares a Philox group with real classes
    (256, 4, None),    # demo: two warps
    (512, 4, 64),      # two class groups per thread, two warps
    (4096, 2, None),   # paper: 256 threads, four groups per thread, eight warps
])
def test_kernels_match_their_references(build_dir, K, N, threads):
    from cvqd.kernels.emulate import EmulatedKernels

    report = parity_report(EmulatedKernels(K, cache_dir=build_dir, threads=threads), "cpu", seq_len=N)
    assert not failures(report), (failures(report), report)
    assert report["philox_bits_identical"] and report["fused_step_mismatch_frac"] == 0.0


def test_loop_device_path_with_the_kernels_equals_the_torch_step(build_dir):
    """ReverseLoop's GPU code path (step index in device memory, fused kernel, in-place tokens, advance kernel)
    with the emulated kernels gives the tokens of the torch-step loop."""
    from cvqd.model.config import preset
    from cvqd.kernels.emulate import EmulatedKernels
    from cvqd.model.loop import ReverseLoop
    from cvqd.model.schedule import MaskReplaceSchedule
    from cvqd.model.transformer import DiffusionTransformer

    torch.manual_seed(0)
    cfg = preset("tiny").transformer
    net = DiffusionTransformer(cfg).eval()
    with torch.no_grad():
        net.head.weight.mul_(40)
    sched = MaskReplaceSchedule(cfg.num_classes, cfg.num_steps)
    cond = torch.nn.functional.normalize(torch.randn(2, cfg.cond_dim), dim=-1)
    null = torch.nn.functional.normalize(torch.randn(cfg.cond_dim), dim=0)
    kern_loop = ReverseLoop(net.logits, sched, cfg.seq_len, "cpu", kernels=EmulatedKernels(cfg.num_classes, build_dir))
    torch_loop = ReverseLoop(net.logits, sched, cfg.seq_len, "cpu")
    assert kern_loop.step_impl == "cuda-kernels"
    with torch.no_grad():
        for steps, g, r in [(5, 2.5, 0.8), (2, 1.0, 1.0)]:  # strided guided + truncated; unguided
            a = kern_loop.run(cond, null, [3, 4], steps=steps, guidance=g, truncation=r)
            b = torch_loop.run(cond, null, [3, 4], steps=steps, guidance=g, truncation=r)
            assert torch.equal(a, b), (steps, g, r)
