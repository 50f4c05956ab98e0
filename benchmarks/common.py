"""Shared helpers of every benchmark: one timing summary, one provenance record, atomic JSON output.

    summary(ms)            median and spread (p10, p25, p75, p90, min) of times in milliseconds, and the run count
    provenance(model)      command, git commit (+ dirty flag), model sha256, date, machine: every result JSON
                           starts with it (cvqd.machine.provenance; cvqd-eval writes the same fields)
    write_json(name, obj)  a bare name goes to benchmarks/results/, a name with a folder is used as given
    MIN_RUNS               the fewest runs behind a published median
    positive_int           an argparse type for counts (runs, repeats)
    run_main(main, prog)   runs a benchmark's main(); bad input (a cvqd error) ends in one line and exit 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from cvqd.errors import CvqdError
from cvqd.io import write_json as cvqd_write_json
from cvqd.machine import load_average, provenance  # noqa: F401  (re-exported for the benchmarks)

RESULTS = Path(__file__).resolve().parent / "results"
MIN_RUNS = 20  # a published median comes from at least this many runs


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def run_main(main: Callable[[], Any], prog: str) -> None:
    """Run a benchmark's main(); a CvqdError (missing or bad checkpoint, settings out of range) is one line, exit 2."""
    try:
        main()
    except CvqdError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def summary(ms: list[float]) -> dict[str, float]:
    """Median and spread of times in milliseconds: p10, p25, p75, p90 (inclusive quantiles), min, runs."""
    if not ms:
        raise ValueError("summary() of no times")
    ms = sorted(float(x) for x in ms)
    if len(ms) == 1:
        q = [ms[0]] * 19
    else:
        q = statistics.quantiles(ms, n=20, method="inclusive")  # 5% steps: q[1] = p10, q[4] = p25, q[14] = p75, q[17] = p90
    return {"median_ms": round(statistics.median(ms), 3), "p10_ms": round(q[1], 3), "p25_ms": round(q[4], 3),
            "p75_ms": round(q[14], 3), "p90_ms": round(q[17], 3), "min_ms": round(ms[0], 3), "runs": len(ms)}


def write_json(name: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write payload atomically; a bare file name goes to benchmarks/results/, a name with a folder in it is a path."""
    path = Path(name) if Path(name).parent != Path(".") else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return cvqd_write_json(path, payload)
