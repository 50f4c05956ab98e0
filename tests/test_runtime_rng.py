"""Philox4x32-10 (cvqd/model/rng.py): known answers, key/counter layout, batch independence, uniform/Gumbel law."""

import math

import numpy as np
import pytest
import torch

from cvqd.model.rng import (GumbelSource, gumbel_bits, gumbel_noise, gumbel_uniforms, philox4x32, seed_key,
                              seed_key_array, seed_keys, uniform_from_bits)

# Random123's published known-answer vectors for Philox4x32-10 (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers(counter, key, expected):
    out = philox4x32([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in out) == expected


def test_known_answers_vectorised():
    # all three vectors in one batched call: broadcasting does not mix lanes
    c = [torch.tensor([v[0][i] for v in KAT]) for i in range(4)]
    k = [torch.tensor([v[1][i] for v in KAT]) for i in range(2)]
    out = torch.stack(philox4x32(c, k), dim=1)
    assert out.tolist() == [list(v[2]) for v in KAT]


def test_numpy_and_torch_implementations_are_bit_identical():
    keys = seed_keys([0, 1, 2**40 + 17, -3, 0xFFFFFFFF])
    steps = torch.tensor([0, 1, 99, 0xFFFFFFFF])
    a = gumbel_bits(keys, steps, 4097, 19, impl="numpy")
    b = gumbel_bits(keys, steps, 4097, 19, impl="torch")
    assert a.shape == (4, 5, 4097, 19) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) <= 0xFFFFFFFF
    # the CPU uniforms (numpy arithmetic on uint32 words) equal the torch reference conversion
    assert torch.equal(gumbel_uniforms(keys, steps, 4097, 19), uniform_from_bits(b))
    assert torch.equal(gumbel_uniforms(keys, 99, 33, 7), uniform_from_bits(gumbel_bits(keys, 99, 33, 7, impl="torch")))


def test_seed_key_wraps_to_64_bits():
    assert seed_key(0) == (0, 0)
    assert seed_key(1) == (1, 0)
    assert seed_key((7 << 32) + 5) == (5, 7)
    assert seed_key(-1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert seed_keys([3, 4]).tolist() == [[3, 0], [4, 0]]


def test_layout_matches_the_documented_counter():
    keys = seed_keys([11, 12])
    bits = gumbel_bits(keys, 5, num_classes=10, seq_len=3)  # [B, C, N]
    assert bits.shape == (2, 10, 3)
    b, c, n = 1, 6, 2
    ref = philox4x32([torch.tensor(c // 4), torch.tensor(n), torch.tensor(5), torch.tensor(0)],
                     [torch.tensor(12), torch.tensor(0)])
    assert int(bits[b, c, n]) == int(ref[c % 4])


def test_rows_are_independent_of_batching_and_steps_vectorise():
    a = gumbel_bits(seed_keys([7]), 3, 33, 16)
    b = gumbel_bits(seed_keys([1, 7, 9]), 3, 33, 16)
    assert torch.equal(a[0], b[1])
    many = gumbel_bits(seed_keys([1, 7]), torch.arange(2, 5), 33, 16)  # [S, B, C, N]
    assert torch.equal(many[1], gumbel_bits(seed_keys([1, 7]), 3, 33, 16))
    assert torch.equal(gumbel_bits(seed_keys([1]), torch.tensor(4), 33, 16), many[2, :1])
    assert not torch.equal(many[0], many[1])


def test_uniforms_are_exact_and_open():
    bits = torch.tensor([0, 511, 512, 0xFFFFFFFF])
    u = uniform_from_bits(bits)
    assert u.dtype == torch.float32
    assert u.tolist() == [2.0 ** -24, 2.0 ** -24, 3 * 2.0 ** -24, 1 - 2.0 ** -24]
    assert bool((u > 0).all() and (u < 1).all())


def test_distribution_sanity():
    u = gumbel_uniforms(seed_keys([0, 1, 2, 3]), 0, 257, 64).flatten()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    g = gumbel_noise(seed_keys([0, 1, 2, 3]), 1, 257, 64).flatten()
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.var().item() - math.pi ** 2 / 6) < 0.06
    # Gumbel-max picks class c with probability p_c
    logp = torch.log(torch.tensor([0.5, 0.3, 0.2])).view(1, 3, 1)
    draws = torch.cat([(logp + gumbel_noise(seed_keys([s]), 0, 3, 1)).argmax(1) for s in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_gumbel_source_chunks_equal_single_steps():
    keys = seed_key_array([5, 6])
    src = GumbelSource(keys, 17, 8, num_steps=7, max_elems=2 * 17 * 8 * 3)  # chunks of 3 steps
    assert src.chunk == 3
    for i in range(7):
        assert np.array_equal(src(i), gumbel_noise(keys, i, 17, 8))


def test_numpy_keys_give_the_same_uniforms_as_tensors_on_every_path():
    """The torch-free CPU runtime (numpy keys) draws exactly the uniforms of the torch paths; the Gumbel noise is
    -log(-log(u)) in each library's float32 log, equal to within an ulp or two."""
    seeds = [0, 3, 2**63 + 5]
    steps = torch.arange(0, 4)
    u_np = gumbel_uniforms(seed_key_array(seeds), steps.numpy(), 261, 9)
    assert isinstance(u_np, np.ndarray) and u_np.dtype == np.float32
    assert torch.equal(torch.from_numpy(u_np), uniform_from_bits(gumbel_bits(seed_keys(seeds), steps, 261, 9,
                                                                             impl="torch")))
    g_np = gumbel_noise(seed_key_array(seeds), 2, 261, 9)
    g_t = gumbel_noise(seed_keys(seeds), 2, 261, 9)
    assert torch.allclose(torch.from_numpy(g_np), g_t, rtol=1e-6, atol=1e-6)
