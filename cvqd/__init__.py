"""cvqd: CLIP-VQDiffusion, caption-free text-to-image training and a fast inference runtime.

Sub-packages (each a top-level folder of the repository):
  cvqd.runtime   the reverse-diffusion loop, schedule math, backends and the `cvqd-run` command
  cvqd.training  models (Gumbel-VQGAN, diffusion transformer, CLIP conditioning), losses, `cvqd-train`
  cvqd.export    checkpoint -> plan directory (ONNX, TensorRT)
  cvqd.kernels   fused CUDA C sampling kernels (NVRTC)
"""

__version__ = "0.1.0"

from cvqd.errors import CvqdError  # noqa: E402

__all__ = ["CvqdError", "__version__"]
