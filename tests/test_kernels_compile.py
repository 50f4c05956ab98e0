"""Every CUDA C kernel source compiles with NVRTC on this machine (NVRTC needs no GPU or driver)."""

import re

import pytest

from cvqd.kernels import nvrtc
from cvqd.kernels.sampling import KERNEL_NAMES


CASES = [("sm_90", 32), ("sm_90", 256), ("sm_90", 4096), ("sm_90", 30),  # tiny, demo, paper, K % 4 != 0
         ("sm_80", 256), ("compute_90", 4096), ("compute_80", 32)]


@pytest.mark.parametrize("arch,K", CASES)
def test_sampling_kernels_compile(arch, K):
    opts = nvrtc.sampling_options(K) + (("--ptxas-options=-v",) if arch.startswith("sm_") else ())
    image, log = nvrtc.compile_source(nvrtc.read_source(), "sampling.cu", arch, opts)
    assert len(image) > 1000
    assert "warning" not in log.lower(), log
    if arch.startswith("compute_"):
        ptx = image.decode(errors="replace")
        for name in KERNEL_NAMES:  # every kernel the launcher looks up is in the module
            assert re.search(rf"\.entry\s+{name}\b", ptx), name
        assert f".target sm_{arch.split('_')[1]}" in ptx
    else:  # ptxas report: every kernel built, none spills registers to local memory
        for name in KERNEL_NAMES:
            assert f"entry function '{name}'" in log, name
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert len(spills) == len(KERNEL_NAMES) and set(spills) == {"0"}, log


def test_block_size_and_options():
    assert nvrtc.sampling_block_size(32) == 32
    assert nvrtc.sampling_block_size(256) == 64
    assert nvrtc.sampling_block_size(4096) == 256
    assert "-DCVQD_K=4096" in nvrtc.sampling_options(4096)
    with pytest.raises(ValueError):
        nvrtc.sampling_options(1)


def test_compile_cache_is_keyed_by_arch_and_K(tmp_path):
    a = nvrtc.compile_sampling(32, "sm_80", cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".cubin" and "sm_80" in files[0].name
    assert nvrtc.compile_sampling(32, "sm_80", cache_dir=tmp_path) == a  # read back from the cache
    files[0].write_bytes(b"cached")  # prove the second call reads the file rather than recompiling
    assert nvrtc.compile_sampling(32, "sm_80", cache_dir=tmp_path) == b"cached"
    nvrtc.compile_sampling(64, "sm_80", cache_dir=tmp_path)
    nvrtc.compile_sampling(32, "compute_90", cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3


def test_bad_arch_is_refused():
    with pytest.raises(ValueError):
        nvrtc.compile_source("", "x.cu", "sm90")
    with pytest.raises(nvrtc.KernelUnavailable):
        nvrtc.compile_source("", "x.cu", "sm_35")


def test_compile_errors_carry_the_log():
    with pytest.raises(RuntimeError, match="could not compile"):
        nvrtc.compile_source("extern \"C\" __global__ void f() { undefined_thing(); }", "bad.cu", "sm_80")
