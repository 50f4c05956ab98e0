"""Inference runtime: backends, CUDA-graph capture, the Pipeline and the `cvqd-run` command.

The model, the step math and the reverse loop come from cvqd.model; nothing here imports cvqd.training or
cvqd.export (only `cvqd-run --ckpt` on a plan backend asks cvqd.export for a plan, from the CLI). Importing
`cvqd.runtime` is cheap; backends load their libraries when they are built.
"""
