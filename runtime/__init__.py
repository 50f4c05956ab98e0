"""Inference runtime: schedule math, the reverse-diffusion loop, backends, the `cvqd-run` command.

Importing `cvqd.runtime` is cheap; backends load their libraries when they are built. Only the `torch`
backend (which runs the PyTorch model) imports `cvqd.training`; plans run without it.
"""
