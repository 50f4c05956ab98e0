"""cvqd-eval: the report's arithmetic, best-of-N selection, the sweep, and the command line."""

import contextlib
import io
import json

import pytest

from cvqd import evaluation as ev


def test_summary_arithmetic():
    rows = [
        {"prompt": "a", "held_out": False, "clip_score": 0.5,
         "correct": {"colour": True, "shape": True, "size": False, "position": True}},
        {"prompt": "b", "held_out": False, "clip_score": 0.3,
         "correct": {"colour": True, "shape": False, "size": True, "position": True}},
        {"prompt": "c", "held_out": False, "clip_score": 0.1, "correct": {"colour": False, "shape": True}},
        {"prompt": "d", "held_out": False, "clip_score": 0.1,
         "correct": {"colour": True, "shape": True, "size": True, "position": True}},
    ]
    s = ev._summarise(rows)
    assert s["prompts"] == 4 and s["colour"] == 0.75 and s["shape"] == 0.75 and s["size"] == pytest.approx(2 / 3)
    assert s["colour+shape"] == 0.5 and s["all"] == 0.25 and s["clip_score"] == pytest.approx(0.25)


def test_candidate_mean_is_the_average_single_draw():
    judged = [{"colour": True, "shape": True, "size": True}, {"colour": True, "shape": False, "size": True},
              {"colour": False, "shape": True, "size": True}, {"colour": True, "shape": True, "size": False}]
    m = ev._candidate_mean(judged, [0.1, 0.2, 0.3, 0.4])
    assert m["correct"] == {"colour": 0.75, "shape": 0.75, "size": 0.75}
    assert m["colour+shape"] == 0.5 and m["all"] == 0.25 and m["clip_score"] == pytest.approx(0.25)
    # summarised over prompts it is the mean of the per-prompt fractions, with their standard error
    other = ev._candidate_mean([{"colour": False, "shape": False, "size": True}] * 4, [0.0] * 4)
    s = ev._summarise([{"held_out": False, **m}, {"held_out": False, **other}])
    assert s["colour+shape"] == 0.25 and s["colour"] == 0.375 and s["all"] == 0.125
    assert s["colour+shape_se"] == pytest.approx(0.25)  # std([0.5, 0]) / sqrt(2)
    # a single-image row still counts booleans
    one = ev._summarise([{"correct": {"colour": True, "shape": False}, "clip_score": 0.0}])
    assert one["colour+shape"] == 0.0 and one["colour+shape_se"] is None


def test_prompt_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\na purple triangle on the left\n\na red circle\n")
    specs = ev.load_prompts(f)
    assert [s.prompt for s in specs] == ["a purple triangle on the left", "a red circle"]
    assert specs[0].held_out and not specs[1].held_out and specs[1].wanted == {"colour": "red", "shape": "circle"}
    assert len(ev.load_prompts("shapes")) == 180
    from cvqd.errors import CvqdError

    with pytest.raises(CvqdError, match="not found"):
        ev.load_prompts(tmp_path / "none.txt")


def run_eval(*args):
    from cvqd.cli_util import run_command
    from cvqd.eval_cli import eval_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_command(eval_cli, "cvqd-eval", [str(a) for a in args])
    return exc.value.code, out.getvalue(), err.getvalue()


def test_eval_cli_best_of_n_and_sweep(tiny_trained, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle on the left\na large purple triangle at the top\na blue square\n")
    report_path = tmp_path / "r.json"
    code, out, err = run_eval("--ckpt", tiny_trained["cfg"], "--prompts", prompts, "-n", 3, "--steps", 4,
                              "--json", report_path, "--save-images", tmp_path / "imgs", "-q")
    assert code == 0, err
    rep = json.loads(report_path.read_text())
    assert set(rep["table"]) == {"in_distribution", "held_out", "all"}
    assert rep["table"]["held_out"]["best_of_1"]["prompts"] == 1
    assert rep["table"]["in_distribution"]["best_of_3"]["prompts"] == 2
    for row in rep["per_prompt"]:
        assert len(row["clip_scores"]) == 3 and row["clip_scores"][row["best"]] == max(row["clip_scores"])
    b1, b3 = rep["table"]["all"]["best_of_1"], rep["table"]["all"]["best_of_3"]
    assert b3["clip_score"] >= b1["clip_score"] and 0 <= b1["colour"] <= 1
    # the candidate mean re-derived from the per-prompt verdicts of all three candidates
    mean = rep["table"]["all"]["mean_of_3"]
    hits = [[v["colour"] == row["wanted"]["colour"] and v["shape"] == row["wanted"]["shape"] for v in row["verdicts"]]
            for row in rep["per_prompt"]]
    assert mean["colour+shape"] == pytest.approx(sum(map(sum, hits)) / 9)
    assert mean["clip_score"] == pytest.approx(sum(sum(r["clip_scores"]) for r in rep["per_prompt"]) / 9)
    assert "1 avg" in out
    assert "colour+shape" in out and len(list((tmp_path / "imgs").iterdir())) == 3
    assert rep["settings"]["steps"] == 4 and rep["machine"]["cores"] >= 1

    code, out, err = run_eval("--ckpt", tiny_trained["cfg"], "--prompts", prompts, "-n", 1, "--steps", 2,
                              "--sweep-guidance", "1,2", "--sweep-truncation", "0.9", "--json", tmp_path / "s.json", "-q")
    assert code == 0, err
    rows = json.loads((tmp_path / "s.json").read_text())["sweep"]
    assert [(r["guidance"], r["truncation"]) for r in rows] == [(1.0, 0.9), (2.0, 0.9)]
    assert rows[0]["n1"] == "candidate 0" and not any(k.startswith("best_of_") for k in rows[0])

    # with N > 1 candidates a sweep row's plain columns are the N = 1 accuracy averaged over the candidates (what
    # a plain evaluation calls mean_of_N), and best-of-N comes apart under best_of_N/
    code, out, err = run_eval("--ckpt", tiny_trained["cfg"], "--prompts", prompts, "-n", 2, "--steps", 2,
                              "--sweep-guidance", "2", "--sweep-truncation", "0.9", "--json", tmp_path / "s2.json")
    assert code == 0, err
    (row,) = json.loads((tmp_path / "s2.json").read_text())["sweep"]
    code, _, err2 = run_eval("--ckpt", tiny_trained["cfg"], "--prompts", prompts, "-n", 2, "--steps", 2,
                             "--guidance", 2, "--truncation", 0.9, "--json", tmp_path / "r2.json", "-q")
    assert code == 0, err2
    table = json.loads((tmp_path / "r2.json").read_text())["table"]
    assert row["n1"] == "mean of 2 candidates"
    for split in ("in_distribution", "held_out", "all"):
        for k in ("colour+shape", "all", "clip_score"):
            assert row[f"{split}/{k}"] == pytest.approx(table[split]["mean_of_2"][k])
            assert row[f"best_of_2/{split}/{k}"] == pytest.approx(table[split]["best_of_2"][k])
    assert "N=1 colour+shape" in err and "best-of-2 colour+shape" in err  # the progress line shows both


def test_eval_cli_errors(tmp_path):
    code, _, err = run_eval("--ckpt", tmp_path / "none.pt", "-q")
    assert code == 2 and "checkpoint not found" in err and "Traceback" not in err
    code, _, err = run_eval("--ckpt", tmp_path / "none.pt", "--sweep-guidance", "1,x", "-q")
    assert code == 2


def test_machine_description_names_the_cpu_beyond_its_bare_model_name():
    """A VM's "model name" can be "AMD EPYC" on hosts ~2x apart per step; records carry family, model and clock."""
    from pathlib import Path

    from cvqd.machine import describe_machine, machine_words

    m = describe_machine()
    assert m["cores"] >= 1 and m["cpu"] is not None
    if Path("/proc/cpuinfo").exists() and "cpu family" in Path("/proc/cpuinfo").read_text():
        assert m["cpu_family"].isdigit() and float(m["cpu_mhz"]) > 0
    assert machine_words({"cpu": "AMD EPYC", "cores": 2, "cpu_family": "25", "cpu_model": "1", "cpu_mhz": "2445.406"}) \
        == "AMD EPYC (2 cores; family 25, model 1, 2445 MHz)"
    assert machine_words({"cpu": "AMD EPYC", "cores": 2}) == "AMD EPYC (2 cores)"  # records written before these fields
