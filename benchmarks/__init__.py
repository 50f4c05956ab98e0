"""cvqd's benchmarks: run each as a module from the repository root, e.g. `python -m benchmarks.runtime_cpu`.

Shared helpers (timing summary, provenance, JSON output) live in benchmarks/common.py; results go to
benchmarks/results/ and `python -m benchmarks.report` renders the README's tables from them.
"""
