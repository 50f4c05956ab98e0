"""The README's performance and quality tables are the rendering of the result JSON (benchmarks/report.py).

The README must equal its rendering; the check must be able to fail (a changed number, a missing block); every
published record carries its provenance (command, commit, dirty flag, model sha256, date, machine); a GPU record
without provenance is not published.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repository root on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.common import summary  # noqa: E402
RESULT_DIRS = ("benchmarks/results", "docs/results")


def test_readme_equals_its_rendering():
    diff = report.check(ROOT / "README.md", ROOT)
    assert diff == "", "README.md differs from the result JSON; run `python -m benchmarks.report`:\n" + diff


def test_export_doc_equals_its_rendering():
    """docs/export.md's measured tables come from the export benchmarks' JSON (python -m benchmarks.report)."""
    assert report.check(report.EXPORT_DOC, report.ROOT, report.EXPORT_BLOCKS) == ""
    text = report.EXPORT_DOC.read_text()
    changed = text.replace("| demo | fp32 |", "| demo | fp32 | 1", 1)
    assert changed != text
    assert report.render_blocks(changed, report.EXPORT_BLOCKS) != changed


def test_a_changed_number_in_the_readme_is_detected(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = report.block_pattern("performance").search(text)
    assert block is not None
    row = next(line for line in block.group(2).splitlines() if line.startswith("| ") and "CPU," in line)
    cells = row.split("|")
    cells[4] = " 1.0 (0.9-1.1) "  # a made-up end-to-end time
    changed = "|".join(cells)
    bad = tmp_path / "README.md"
    bad.write_text(text.replace(row, changed, 1))
    assert report.check(bad, ROOT) != ""
    assert report.main(["--check", "--readme", str(bad)]) == 1
    assert report.main(["--check", "--readme", str(ROOT / "README.md")]) == 0


def test_a_quality_number_and_a_missing_block_are_detected(tmp_path):
    text = (ROOT / "README.md").read_text()
    body = report.block_pattern("quality").search(text).group(2)
    bad = tmp_path / "README.md"
    bad.write_text(text.replace(body, body.replace("0.", "1.", 1), 1))
    assert report.check(bad, ROOT) != ""
    bad.write_text(report.block_pattern("quality").sub("", text))
    with pytest.raises(report.ReportError):
        report.check(bad, ROOT)
    assert report.main(["--check", "--readme", str(bad)]) == 2


@pytest.mark.parametrize("folder", RESULT_DIRS)
def test_every_result_json_carries_its_provenance(folder):
    files = sorted((ROOT / folder).glob("*.json"))
    assert files, folder
    for f in files:
        rec = json.loads(f.read_text())
        missing = report.missing_provenance(rec)
        assert not missing, f"{f.relative_to(ROOT)} lacks {missing}"
        assert len(rec["commit"]) == 40 and rec["command"] and rec["machine"].get("cpu")


def test_every_row_names_the_machine_and_the_commit():
    # the install, official and ar blocks' rows each come from one record, named once in their first line
    for fn, command in ((report.render_install, "benchmarks.slim_runtime"),
                        (report.render_official, "benchmarks.official_cpu"),
                        (report.render_quality, "--prompts shapes:test"),
                        (report.render_ar, "benchmarks.ar_vs_diffusion")):
        first = fn(ROOT).splitlines()[0]
        assert "commit `" in first and "cores" in first and command in first
    quality = report.render_quality(ROOT)  # its training-seed rows each name their own record's machine and commit
    seeds = [ln for ln in quality.splitlines() if ln.startswith("| `")]
    assert seeds
    for row in seeds:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[-1].startswith("`") and "cores" in cells[-2], row
    for name, fn in report.BLOCKS.items():
        if name in ("install", "official", "quality", "ar"):
            continue
        rows = [ln for ln in fn(ROOT).splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
        assert rows, name
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[-1].startswith("`") and len(cells[-1].split("`")[1]) == 7, row  # the commit
            assert "cores" in cells[-2], row  # machine_words


def test_gpu_records_without_provenance_are_not_published(tmp_path):
    for rel in (report.RUNTIME_CPU, report.QUALITY):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    cpu = json.loads((ROOT / report.RUNTIME_CPU).read_text())
    variant = {"describe": {"precision": "bf16"}, "end_to_end": summary([10.0 + i / 10 for i in range(20)]),
               "loop": summary([8.0 + i / 10 for i in range(20)])}
    gpu = {"benchmark": "runtime_gpu", "preset": "paper", "batch": 1, "steps": 100, "guidance": 3.0,
           "truncation": 0.9, "variants": {"eager": variant, "graph+kernels": variant}}
    (tmp_path / "benchmarks/results/runtime_gpu.json").write_text(json.dumps(gpu))
    text = report.render_performance(tmp_path)
    assert "GPU," not in text and "runtime_gpu.json" in text and "GPU numbers" in text
    gpu.update({k: cpu[k] for k in report.PROVENANCE}, model_sha256=None)
    (tmp_path / "benchmarks/results/runtime_gpu.json").write_text(json.dumps(gpu))
    text = report.render_performance(tmp_path)
    assert "GPU, batch 1" in text and "GPU numbers" not in text and "paper preset, random weights" in text
    # no bundled model in tmp_path: the CPU rows say their model is not it
    assert "**not** the bundled demo.pt" in text
    # fewer than 20 runs: not published either
    few = {"describe": {"precision": "bf16"}, "end_to_end": summary([10.0] * 6), "loop": summary([8.0] * 6)}
    gpu["variants"] = {"eager": few, "graph+kernels": few}
    (tmp_path / "benchmarks/results/runtime_gpu.json").write_text(json.dumps(gpu))
    assert "GPU, batch 1" not in report.render_performance(tmp_path)


def test_summary_median_and_spread():
    s = summary([float(x) for x in range(1, 22)])  # 1..21 ms
    assert s["median_ms"] == 11 and s["min_ms"] == 1 and s["runs"] == 21
    assert s["p10_ms"] == 3 and s["p25_ms"] == 6 and s["p75_ms"] == 16 and s["p90_ms"] == 19


def test_command_line_is_a_shell_line():
    from cvqd.machine import command_line

    assert command_line(["/x/.venv/bin/cvqd-eval", "--ckpt", "a b.pt", "-n", "8"]) == "cvqd-eval --ckpt 'a b.pt' -n 8"
