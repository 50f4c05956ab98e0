"""cvqd: CLIP-VQDiffusion, caption-free text-to-image training and a fast inference runtime.

Sub-packages; the dependency graph is a tree: cvqd.model <- {cvqd.training, cvqd.export, cvqd.runtime}
  cvqd.model     the model: configs, checkpoints, Gumbel-VQGAN, diffusion transformer, CLIP wrapper, schedule and
                 posterior math, the sampling step, the reverse loop, the plan format (cvqd/model/)
  cvqd.training  training stages, losses, data, the shapes benchmark, `cvqd-train` (training/)
  cvqd.export    checkpoint -> plan directory: ONNX graphs, validation, TensorRT engines, `cvqd-export` (export/)
  cvqd.runtime   backends (ONNX Runtime, torch, TensorRT), CUDA graphs, the Pipeline, `cvqd-run` (runtime/)
  cvqd.kernels   fused CUDA C sampling kernels compiled with NVRTC, used by the runtime (kernels/)
Top-level helpers: cvqd.paths, cvqd.io, cvqd.machine, cvqd.threads, cvqd.images; `cvqd-eval` is cvqd.eval_cli over
cvqd.evaluation.
"""

__version__ = "0.1.0"

from cvqd.errors import CvqdError  # noqa: E402

__all__ = ["CvqdError", "__version__"]
