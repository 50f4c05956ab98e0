"""Fused CUDA C kernels for the per-step sampling math, compiled at run time with NVRTC."""
