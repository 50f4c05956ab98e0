"""cvqd-eval refuses what it cannot score, and checks its output path before evaluating."""

import contextlib
import io

import pytest


def invoke(*args):
    from cvqd.cli_util import run_command
    from cvqd.eval_cli import eval_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_command(eval_cli, "cvqd-eval", [str(a) for a in args])
    return exc.value.code, err.getvalue()


def test_a_prompt_without_attributes_is_an_error(tmp_path, tiny_ckpt):
    from cvqd.errors import CvqdError
    from cvqd.evaluation import load_prompts

    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle\na photo of something nice\n")
    with pytest.raises(CvqdError, match=r"prompt 2 'a photo of something nice' names no colour"):
        load_prompts(pf)
    code, err = invoke("--ckpt", tiny_ckpt, "--prompts", pf, "-q")
    assert code == 2 and "names no colour" in err and len(err.strip().splitlines()) == 1


def test_output_path_checked_before_evaluating(tmp_path, tiny_ckpt):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, err = invoke("--ckpt", tiny_ckpt, "-n", 1, "--json", blocker / "report.json", "-q")
    assert code == 2 and "not a writable directory" in err, err
    code, err = invoke("--ckpt", tiny_ckpt, "-n", 1, "--json", tmp_path, "-q")
    assert code == 2 and "is a directory" in err, err
