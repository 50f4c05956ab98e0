"""The package dependency graph is a tree: cvqd.model <- {cvqd.training, cvqd.export, cvqd.runtime}.

Statically: no module of one branch imports another branch (the command-line modules, which glue branches
together for the user, are the only exceptions, listed below). At run time: a plan runs, through the Python API
and through `cvqd-run`, in a process where `import cvqd.training` and `import cvqd.export` fail.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# package -> (folder in the repository, packages it must not import)
BRANCHES = {
    "cvqd.model": ("cvqd/model", {"cvqd.runtime", "cvqd.training", "cvqd.export", "cvqd.kernels", "cvqd.evaluation",
                                  "cvqd.eval_cli"}),
    "cvqd.runtime": ("runtime", {"cvqd.training", "cvqd.export", "cvqd.evaluation", "cvqd.eval_cli"}),
    "cvqd.export": ("export", {"cvqd.training", "cvqd.runtime", "cvqd.kernels", "cvqd.evaluation", "cvqd.eval_cli"}),
    "cvqd.training": ("training", {"cvqd.runtime", "cvqd.export", "cvqd.kernels", "cvqd.evaluation",
                                   "cvqd.eval_cli"}),
    "cvqd.kernels": ("kernels", {"cvqd.runtime", "cvqd.training", "cvqd.export", "cvqd.evaluation"}),
}
# The CLI layer: `cvqd-run --ckpt` asks the export package for a plan (the runtime itself never exports).
CLI_LAYER = {"runtime/cli.py": {"cvqd.export"}}
# The base layer under the model package: plain helpers that import no branch at all.
BASE = ["cvqd/errors.py", "cvqd/io.py", "cvqd/paths.py", "cvqd/machine.py", "cvqd/threads.py", "cvqd/images.py",
        "cvqd/cli_util.py", "cvqd/__init__.py"]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names (at any depth: lazy imports inside functions count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
            if node.module == "cvqd":  # from cvqd import evaluation
                out += [(node.lineno, f"cvqd.{a.name}") for a in node.names]
    return out


def under(module: str, packages: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_branches_import_only_the_model_package_and_the_base_layer():
    bad = []
    for pkg, (folder, forbidden) in BRANCHES.items():
        files = sorted((ROOT / folder).glob("*.py"))
        assert files, folder
        for f in files:
            rel = str(f.relative_to(ROOT))
            allowed = CLI_LAYER.get(rel, set())
            bad += [f"{rel}:{line} imports {m}" for line, m in imported_modules(f)
                    if under(m, forbidden) and not under(m, allowed)]
    for rel in BASE:
        bad += [f"{rel}:{line} imports {m}" for line, m in imported_modules(ROOT / rel)
                if under(m, {"cvqd.model", "cvqd.runtime", "cvqd.training", "cvqd.export", "cvqd.kernels"})]
    assert not bad, "import edges that break the tree:\n" + "\n".join(bad)


def test_the_checker_sees_a_forbidden_edge(tmp_path):
    """The rule above can fail: a lazy import inside a function is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from cvqd.training.common import RunDir\n")
    assert [m for _, m in imported_modules(f) if under(m, {"cvqd.training"})] == ["cvqd.training.common"]


BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[:2] in (["cvqd", "training"], ["cvqd", "export"]):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
""")


def run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CVQD_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_a_plan_runs_with_training_and_export_unimportable(tiny_plan, tmp_path):
    out = tmp_path / "api.png"
    proc = run_blocked(f"""
        import sys
        try:
            import cvqd.export
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")
        from cvqd.runtime.pipeline import Pipeline
        pipe = Pipeline.from_plan({str(tiny_plan)!r})
        [g] = pipe.generate(["a red circle"], seed=3, steps=3)
        g.image.save({str(out)!r})
        leaked = sorted(m for m in sys.modules if m.startswith(("cvqd.training", "cvqd.export")))
        assert not leaked, leaked
        print(pipe.describe()["backend"])
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "onnxruntime"
    api = np.asarray(Image.open(out))
    assert api.ndim == 3 and api.shape[2] == 3 and api.std() > 0

    cli_out = tmp_path / "cli.png"
    proc = run_blocked(f"""
        import sys
        from cvqd.runtime.cli import main
        sys.argv = ["cvqd-run", "--engine", {str(tiny_plan)!r}, "--prompt", "a red circle", "--seed", "3",
                    "--steps", "3", "--out", {str(cli_out)!r}, "--json", "-q"]
        main()
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["images"][0]["path"] == str(cli_out)
    assert np.array_equal(np.asarray(Image.open(cli_out)), api)  # same seed, same plan: the same image


def test_ckpt_on_a_plan_backend_without_the_export_package_is_a_one_line_error(tiny_ckpt, tmp_path):
    proc = run_blocked(f"""
        import sys
        from cvqd.runtime.cli import main
        sys.argv = ["cvqd-run", "--ckpt", {str(tiny_ckpt)!r}, "--backend", "onnxruntime", "--prompt", "x",
                    "--out", {str(tmp_path / 'x.png')!r}, "-q"]
        main()
    """, tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "needs the export package" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
