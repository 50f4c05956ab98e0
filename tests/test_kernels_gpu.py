"""Parity of each fused CUDA kernel with its PyTorch reference on a real GPU (skipped without CUDA).

kernels/parity.py runs every kernel (Philox words, guide, truncate, posterior, Gumbel-max, the fused step in and
out of place, the step counter) against cvqd/model/rng.py and cvqd/model/step.py and states the tolerances: Philox
bit-exact, log-probabilities to ~1e-5, sampled tokens equal except within float rounding of a tie.
"""

import pytest

from cvqd.kernels.parity import failures, parity_report

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("K,N,B", [(32, 64, 3), (256, 64, 2), (4096, 256, 1), (4096, 64, 4), (30, 33, 2)])
def test_kernels_match_their_references(K, N, B):
    from cvqd.kernels.sampling import SamplingKernels

    report = parity_report(SamplingKernels(K, "cuda"), "cuda", seq_len=N, batch=B)
    assert not failures(report), (failures(report), report)
    assert report["philox_bits_identical"]


def test_kernel_cache_per_architecture(tmp_path, monkeypatch):
    import torch

    from cvqd.kernels.sampling import SamplingKernels, device_arch

    monkeypatch.setenv("CVQD_CACHE", str(tmp_path))
    SamplingKernels(64, "cuda")
    files = list((tmp_path / "kernels").iterdir())
    assert len(files) == 1 and device_arch(torch.device("cuda")) in files[0].name
