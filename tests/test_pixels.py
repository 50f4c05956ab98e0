"""The numpy CLIP preprocessing (cvqd/model/pixels.py) against the torch one (cvqd/model/clip.py)."""

import numpy as np
import pytest
import torch

from cvqd.model.clip import clip_preprocess as torch_preprocess
from cvqd.model.pixels import clip_preprocess, resize_weights

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("size_in,size_out", [(64, 64), (256, 224), (64, 224), (97, 32), (32, 48)])
def test_numpy_preprocess_matches_torch(size_in, size_out):
    g = torch.Generator().manual_seed(size_in)
    images = torch.rand(2, 3, size_in, size_in, generator=g) * 2 - 1
    ref = torch_preprocess(images, size_out, MEAN, STD)
    got = clip_preprocess(images.numpy(), size_out, MEAN, STD)
    assert got.shape == tuple(ref.shape) and got.dtype == np.float32
    # the same weights summed in a different order in float32: < 3e-5 in [0, 1] pixel units, / std ~ 0.27
    assert np.abs(got - ref.numpy()).max() < 1e-4


def test_resize_weights_rows_sum_to_one():
    for a, b in [(256, 224), (64, 224), (10, 3)]:
        assert np.allclose(resize_weights(a, b).sum(1), 1.0)
