"""torch's CPU thread count, set for a whole process or for one block.

Training stages take `--threads N` for the process; the runtime narrows torch to one thread around the step math
while ONNX Runtime denoises on the same cores, so that the two thread pools do not compete.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


def set_torch_threads(n: int | None) -> None:
    """Use `n` intra-op threads from now on (None or 0: leave torch's default)."""
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch runs on `n` intra-op threads inside the block (None: unchanged), restored afterwards."""
    import torch

    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
