"""The runtime-only install: its size, and `cvqd-run` as a user runs it, against the torch backend, same run.

    python -m benchmarks.slim_runtime                      # 20 interleaved runs per command, sizes of 3 installs
    python -m benchmarks.slim_runtime --runs 10 --first-runs 5

What it does (all on this machine, nothing downloaded: pip resolves from the configured package indexes):
1. Creates a fresh virtual environment and `pip install`s this checkout into it with no extras: the runtime-only
   install (onnxruntime, numpy, pillow, click, tqdm, ftfy, regex). Its site-packages are measured on disk, and
   the environment is checked to hold no torch. pip and setuptools, which every venv gets, are reported apart.
2. Sizes the `[gpu]` and `[train]` installs without installing them: `pip install --dry-run --report` lists the
   wheels each would install, and their uncompressed sizes are summed (for the runtime-only install the same
   estimate is printed beside the measured size, as a check of the method). cvqd itself counts as its files.
3. Times `cvqd-run --prompt P --out X.png` (one image, the model's default settings, default threads) as fresh
   processes, from process start to the PNG on disk:
     slim   the runtime-only environment's cvqd-run: the bundled demo plan on ONNX Runtime, numpy step, no torch
     torch  this environment's cvqd-run --backend torch: the bundled demo checkpoint on PyTorch (the reference)
   interleaved run by run (who goes first alternates), after one warm-up each (page cache). The peak resident
   memory of each process (GNU time's %M, when /usr/bin/time is there) is recorded with it.
4. The first run on an empty cache: the slim command with $CVQD_CACHE pointing at a new empty directory each time
   (the bundled plan needs no export, so this is the same command; it shows that nothing is built on first use).
The JSON (benchmarks/results/slim_runtime.json) starts with the provenance record (command, commit, model sha256,
machine) and gives medians with p10/p25/p75/p90/min.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from benchmarks.common import MIN_RUNS, load_average, positive_int, provenance, run_main, summary, write_json

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a small red circle on the left"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def make_slim_env(root: Path) -> tuple[Path, dict]:
    """A fresh venv with `pip install REPO` (no extras); -> (its python, facts about it)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    py = root / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(REPO)], check=True)
    seconds = time.perf_counter() - t
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    names = sorted(p.name.split("-")[0].lower() for p in site.glob("*.dist-info"))
    # per top-level entry (package folders with their __pycache__, .libs, dist-info), the largest first
    entries = {p.name: (dir_bytes(p) if p.is_dir() else p.stat().st_size) for p in site.iterdir()}
    largest = dict(sorted(entries.items(), key=lambda kv: -kv[1])[:12])
    has_torch = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)"],
                               capture_output=True, text=True, check=True).stdout.strip() == "True"
    tooling = sum(v for k, v in entries.items() if k.split("-")[0].lower() in ("pip", "setuptools", "_distutils_hack"))
    return py, {"site_packages_bytes": dir_bytes(site), "venv_tooling_bytes": tooling,
                "install_seconds": round(seconds, 1), "packages": names, "largest_entries": largest,
                "torch_installed": has_torch}


class RemoteFile(io.RawIOBase):
    """A read-only, seekable view of a file on an HTTP(S) server through Range requests, so zipfile can read a
    remote wheel's central directory (its end) without downloading the wheel."""

    def __init__(self, url: str):
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            data = r.read()
        self.pos += len(data)
        return data


def wheel_bytes(extra: str) -> dict:
    """Uncompressed size of every wheel `pip install .[extra]` would install into an empty environment: local
    wheels are opened, remote ones read through Range requests (only their zip directory travels)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        target = f"{REPO}[{extra}]" if extra else str(REPO)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                        "--report", str(report), target], check=True, capture_output=True)
        items = json.loads(report.read_text())["install"]
    total, per, unsized = 0, {}, []
    for item in items:
        name = item["metadata"]["name"].lower()
        url = item["download_info"]["url"]
        path = Path(unquote(urlparse(url).path))
        if name == "cvqd":  # this checkout: its packaged files
            size = sum(dir_bytes(REPO / d) for d in ("cvqd", "runtime", "export", "training", "kernels"))
        elif path.suffix == ".whl" and url.startswith("file:") and path.is_file():
            with zipfile.ZipFile(path) as zf:
                size = sum(i.file_size for i in zf.infolist())
        elif path.suffix == ".whl" and url.startswith(("http://", "https://")):
            with zipfile.ZipFile(RemoteFile(url)) as zf:
                size = sum(i.file_size for i in zf.infolist())
        else:
            size = None  # an sdist: not sized
            unsized.append(name)
        per[name] = size
        total += size or 0
    return {"bytes": total, "unsized": unsized, "packages": dict(sorted(per.items(), key=lambda kv: -(kv[1] or 0)))}


GNU_TIME = "/usr/bin/time"


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float | None]:
    """(wall ms, peak RSS MiB) of one process.

    The peak comes from GNU time's %M: time is a small process, and the command it forks starts from time's few
    megabytes. (A child forked from this Python process would count this process's own pages in its ru_maxrss,
    which Linux carries across exec.) Without GNU time the peak is not measured (None)."""
    rss_file = cwd / "rss.txt"
    wrapped = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd] if os.path.exists(GNU_TIME) else cmd
    t = time.perf_counter()
    proc = subprocess.run(wrapped, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = (time.perf_counter() - t) * 1e3
    if proc.returncode != 0:
        raise SystemExit(f"slim_runtime: {' '.join(cmd)} failed: {proc.stderr.decode().strip()[-400:]}")
    if wrapped is cmd:
        return wall, None
    return wall, int(rss_file.read_text().split()[-1]) / 1024  # kilobytes


def rss_summary(values: list[float | None]) -> dict:
    if any(v is None for v in values):
        return {"peak_rss_mib_median": None, "peak_rss_mib_max": None}
    return {"peak_rss_mib_median": round(sorted(values)[len(values) // 2], 1), "peak_rss_mib_max": round(max(values), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.slim_runtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=positive_int, default=MIN_RUNS, help="timed runs per command (at least 10)")
    ap.add_argument("--first-runs", type=positive_int, default=5, help="runs on an empty cache")
    ap.add_argument("--out", default="slim_runtime.json", help="a bare name goes to benchmarks/results/")
    args = ap.parse_args()
    if args.runs < 10:
        ap.error(f"--runs {args.runs}: the comparison needs at least 10 runs per command")
    from cvqd.paths import bundled_model

    report = {**provenance(bundled_model()), "benchmark": "slim_runtime", "prompt": PROMPT, "runs": args.runs}
    work = Path(tempfile.mkdtemp(prefix="cvqd-slim-"))
    try:
        print("installing the runtime-only environment ...", file=sys.stderr, flush=True)
        slim_py, facts = make_slim_env(work / "venv")
        if facts["torch_installed"]:
            raise SystemExit("slim_runtime: the runtime-only install pulled in torch")
        report["install"] = {"runtime": facts}
        for extra in ("", "gpu", "train"):
            report["install"][f"estimate_{extra or 'runtime'}"] = wheel_bytes(extra)
        mib = lambda b: b / 2**20  # noqa: E731
        print(f"runtime-only site-packages: {mib(facts['site_packages_bytes']):.0f} MiB; wheels: "
              + ", ".join(f"{k[9:]} {mib(v['bytes']):.0f} MiB" for k, v in report["install"].items()
                          if k.startswith("estimate_")), file=sys.stderr, flush=True)

        cache = work / "cache"
        env = {**os.environ, "CVQD_CACHE": str(cache)}
        env.pop("CVQD_DEFAULT_MODEL", None)
        out = work / "out.png"
        # the installed console scripts, run outside the checkout (so nothing is imported from its folders)
        cmds = {"slim": [str(slim_py.parent / "cvqd-run"), "--prompt", PROMPT, "--out", str(out), "-q"],
                "torch": [str(Path(sys.executable).parent / "cvqd-run"), "--backend", "torch", "--device", "cpu",
                          "--prompt", PROMPT, "--out", str(out), "-q"]}
        for cmd in cmds.values():  # warm-up: page cache, .pyc files
            timed(cmd, env, work)
        walls = {k: [] for k in cmds}
        rss = {k: [] for k in cmds}
        for i in range(args.runs):
            for name in (list(cmds) if i % 2 == 0 else list(cmds)[::-1]):
                w, r = timed(cmds[name], env, work)
                walls[name].append(w)
                rss[name].append(r)
        report["cvqd_run"] = {
            "what": "one image from process start to PNG on disk, fresh process, default settings and threads; "
                    "slim = runtime-only venv, default model (bundled plan, ONNX Runtime CPU, numpy step); "
                    "torch = --backend torch on the bundled checkpoint (the reference)",
            "peak_rss_method": "GNU time %M (maximum resident set size of the command)",
            **{name: {**summary(walls[name]), **rss_summary(rss[name])} for name in cmds},
            "speedup_ratio_of_medians": round(summary(walls["torch"])["median_ms"] / summary(walls["slim"])["median_ms"],
                                              2)}
        first = []
        for i in range(args.first_runs):
            fresh = {**env, "CVQD_CACHE": str(work / f"empty-{i}")}
            first.append(timed(cmds["slim"], fresh, work)[0])
            if (work / f"empty-{i}").exists():
                raise SystemExit("slim_runtime: the first run wrote into the cache (an export happened)")
        report["first_run_empty_cache"] = {"what": "the slim command with $CVQD_CACHE a new empty directory; "
                                                   "nothing is exported or written there", **summary(first)}
        c = report["cvqd_run"]
        print(f"cvqd-run: slim {c['slim']['median_ms']:.0f} ms ({c['slim']['peak_rss_mib_median']:.0f} MiB), torch "
              f"{c['torch']['median_ms']:.0f} ms ({c['torch']['peak_rss_mib_median']:.0f} MiB): "
              f"{c['speedup_ratio_of_medians']:.2f}x; first run on an empty cache "
              f"{report['first_run_empty_cache']['median_ms']:.0f} ms", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = load_average()
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "python -m benchmarks.slim_runtime")
