"""`cvqd-train demo`: the declared stages are valid commands, and the plain runner orders, parallelises, resumes
and fails as documented."""

import json
import sys
import time
from pathlib import Path

import click
import pytest

from cvqd.errors import CvqdError
from cvqd.model.config import preset
from cvqd.training.demo import (DemoRecipe, Stage, demo_stages, finished, recipe_overrides, recipe_with, run_stages,
                                show)


def test_every_stage_command_parses_with_its_real_command_line(tmp_path):
    """Each stage's arguments are accepted by the click command it names (parsed, not run)."""
    from cvqd.eval_cli import eval_cli
    from cvqd.training.cli import cli as train_cli

    stages = demo_stages(DemoRecipe(), tmp_path / "work", tmp_path / "demo.pt")
    names = [s.name for s in stages]
    assert names == ["data_captioned", "data_train", "clip", "vqgan", "vqgan-restart", "vqgan-decoder", "noise_alpha",
                     "diffusion", "cfg", "validation", "guidance", "finalize", "eval"]
    for s in stages:
        assert all(a in names[:names.index(s.name)] for a in s.after), s.name  # declared in dependency order
        if s.call is not None:
            continue
        argv = [a.format(noise_alpha=0.5, guidance=1.5, guidance_low=1, guidance_high=2) for a in map(str, s.argv)]
        if "cvqd.training.cli" in argv:
            args, command = argv[argv.index("cvqd.training.cli") + 1:], train_cli
            sub = command.get_command(click.Context(command), args[0])
            assert sub is not None, s.name
            sub.make_context(args[0], args[1:])  # raises click.UsageError on an unknown or malformed option
        else:
            args = argv[argv.index("cvqd.eval_cli") + 1:]
            eval_cli.make_context("cvqd-eval", args)
    diffusion = next(s for s in stages if s.name == "diffusion")
    assert "{noise_alpha}" in diffusion.argv and diffusion.after == ("vqgan-decoder", "noise_alpha")
    assert show(diffusion.argv).startswith("torchrun --standalone --nproc_per_node 2 -m cvqd.training.cli diffusion")
    finalize = next(s for s in stages if s.name == "finalize")
    assert "--vqgan-from" in finalize.argv and str(tmp_path / "work" / "runs" / "vqgan-decoder" / "model.pt") in \
        finalize.argv
    assert finalize.after == ("guidance",) and "{guidance}" in finalize.argv
    validation = next(s for s in stages if s.name == "validation")
    assert "shapes:validation" in validation.argv and "shapes:test" in next(s for s in stages if s.name == "eval").argv


def test_guidance_is_chosen_on_validation_with_its_range(tmp_path):
    from cvqd.training.demo import choose_guidance

    def row(g, full, short):
        return {"guidance": g, "full/in_distribution/colour+shape": full, "short/in_distribution/colour+shape": short}

    sweep = tmp_path / "v.json"
    sweep.write_text(json.dumps({"sweep": [row(3, 0.5, 0.4), row(1, 0.9, 0.7), row(1.5, 0.92, 0.8),
                                           row(2, 0.9, 0.76)]}))
    got = choose_guidance(sweep, DemoRecipe())
    assert (got["guidance"], got["guidance_low"], got["guidance_high"]) == (1.5, 1.5, 2)  # 1 scores 0.80 < 0.81
    got = choose_guidance(sweep, recipe_with(["range_tolerance=0.1"]))
    assert (got["guidance_low"], got["guidance_high"]) == (1, 2)
    fixed = choose_guidance(sweep, recipe_with(["guidance=3"]))
    assert (fixed["guidance"], fixed["guidance_low"], fixed["guidance_high"]) == (3, 1.5, 3)


def test_skipped_tokenizer_stages_and_a_fixed_alpha_change_the_chain(tmp_path):
    r = recipe_with(["vqgan_restart_steps=0", "vqgan_decoder_steps=0", "noise_alpha=0.4"])
    stages = {s.name: s for s in demo_stages(r, tmp_path, tmp_path / "o.pt")}
    assert "vqgan-restart" not in stages and "noise_alpha" not in stages
    assert stages["diffusion"].after == ("vqgan", "clip") and "0.4" in stages["diffusion"].argv


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_runner_respects_order_and_parallelism_and_fills_measured_values(tmp_path):
    log = tmp_path / "order.txt"
    step = "import sys,time; open({log!r},'a').write(sys.argv[1]+' start\\n'); time.sleep(0.6); " \
           "open({log!r},'a').write(sys.argv[1]+' end\\n'); open(sys.argv[2],'w').write(sys.argv[3] if len(sys.argv)>3 else '')"
    code = step.format(log=str(log))

    def stage(name, *extra, after=()):
        return Stage(name, tmp_path / name, _py(code) + (name, str(tmp_path / name), *extra), after=after)

    stages = [stage("a"), stage("b"), stage("c", "{alpha}", after=("m",)),
              Stage("m", tmp_path / "m.json", call=lambda: {"alpha": "0.25"}, after=("a",))]
    t0 = time.perf_counter()
    ran = run_stages(stages, tmp_path / "logs", env=None, parallel=2, say=lambda m: None, poll=0.05)
    lines = log.read_text().splitlines()
    assert set(lines[:2]) == {"a start", "b start"}  # two side by side
    assert lines.index("c start") > lines.index("a end")  # c waited for a (through m)
    assert (tmp_path / "c").read_text() == "0.25"  # the measured value filled the placeholder
    assert ran["values"] == {"alpha": "0.25"} and ran["kept"] == []
    assert set(ran["seconds"]) == {"a", "b", "c", "m"} and ran["ends"]["c"] <= time.perf_counter() - t0 + 0.1
    assert "{alpha}" not in ran["commands"]["c"] and "0.25" in ran["commands"]["c"]

    # A rerun keeps what is there (outputs exist) and runs nothing
    again = run_stages(stages, tmp_path / "logs", env=None, parallel=2, say=lambda m: None, poll=0.05)
    assert sorted(again["kept"]) == ["a", "b", "c", "m"] and again["seconds"] == {}


def test_runner_stops_the_others_and_names_the_log_on_failure(tmp_path):
    slow = Stage("slow", tmp_path / "slow", _py(f"import time; time.sleep(30); open({str(tmp_path / 'slow')!r}, 'w')"))
    bad = Stage("bad", tmp_path / "bad", _py("import sys; print('boom'); sys.exit(3)"))
    after_bad = Stage("next", tmp_path / "next", _py(f"open({str(tmp_path / 'next')!r}, 'w')"), after=("bad",))
    t0 = time.perf_counter()
    with pytest.raises(CvqdError, match=r"demo stage bad failed \(exit 3\); see .*bad\.log"):
        run_stages([slow, bad, after_bad], tmp_path / "logs", env=None, parallel=2, say=lambda m: None, poll=0.05)
    assert time.perf_counter() - t0 < 20  # the slow one was stopped, not waited for
    assert "boom" in (tmp_path / "logs" / "bad.log").read_text()
    assert not (tmp_path / "next").exists() and not (tmp_path / "slow").exists()


def test_runner_rejects_unknown_predecessors(tmp_path):
    with pytest.raises(CvqdError, match="unknown stage"):
        run_stages([Stage("x", tmp_path / "x", _py("pass"), after=("nope",))], tmp_path, env=None)


def test_run_folder_is_finished_only_at_its_requested_steps(tiny_trained):
    run = Path(tiny_trained["diffusion"]).parent
    assert finished(Stage("diffusion", run, run_folder=True))
    steps = json.loads((run / "run.json").read_text())["config"]["steps"]
    assert steps >= 1
    assert not finished(Stage("missing", run.parent / "nothing-here", run_folder=True))


def test_recipe_overrides_and_errors():
    r = recipe_with(["vqgan_steps=10", "noise_alpha=0.3", "vqgan_straight_through=false", "device=cpu"])
    assert (r.vqgan_steps, r.noise_alpha, r.vqgan_straight_through) == (10, 0.3, False)
    assert recipe_with(["noise_alpha=none"], r).noise_alpha is None
    assert recipe_overrides(json.loads(json.dumps(r.__dict__))) == {
        "vqgan_steps": "10", "noise_alpha": "0.3", "vqgan_straight_through": "False"}
    for bad, needle in (("vqgan_steps=abc", "expected int"), ("vqgan_steps=none", "expected int"),
                        ("nope=1", "key one of"), ("noise_shaped=2", "noise_shaped"),
                        ("diffusion_final_lr_ratio=1.5", "diffusion_final_lr_ratio"), ("device=tpu", "'cpu' or 'cuda'"),
                        ("truncation=0", "truncation"), ("cfg_steps=0", "cfg_steps")):
        with pytest.raises(CvqdError, match=needle.replace("(", r"\(")):
            recipe_with([bad])


@pytest.mark.slow
def test_demo_from_nothing_end_to_end_with_a_tiny_recipe(tmp_path):
    """Every declared stage really runs (subprocesses, torchrun with 2 gloo processes, finalize, cvqd-eval), and
    the record carries one measured training time; a rerun keeps every stage and records none."""
    import subprocess

    from cvqd.model.checkpoint import load_checkpoint

    sets = ["data_count=48", "clip_steps=2", "clip_batch=8", "vqgan_steps=2", "vqgan_batch=2",
            "vqgan_restart_steps=1", "vqgan_decoder_steps=1", "diffusion_steps=2", "diffusion_batch=4",
            "diffusion_warmup=1", "cfg_steps=2", "eval_candidates=1", "steps=3", "truncation=0.9",
            "noise_alpha=0.4", "sweep_guidance=1,1.5", "sweep_candidates=1"]
    args = ["demo", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "demo.pt")]
    args += [x for s in sets for x in ("--set", s)]
    def demo():
        proc = subprocess.run([sys.executable, "-m", "cvqd.training.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr

    assert "trained from nothing in" in demo()
    rec = json.loads((tmp_path / "demo.json").read_text())
    assert rec["from_nothing"] and rec["kept"] == [] and 0 < rec["training_seconds"] <= rec["wall_seconds"]
    assert set(rec["commands"]) == {"data_captioned", "data_train", "clip", "vqgan", "vqgan-restart", "vqgan-decoder",
                                    "diffusion", "cfg", "validation", "finalize", "eval"}
    assert rec["model_sha256"] and rec["commit"] is not None and "cvqd.training.cli demo --work" in rec["command"]
    assert rec["eval"]["settings"]["steps"] == 3 and rec["eval"]["settings"]["prompts"] == 252  # the test split
    choice = rec["sampling_choice"]
    assert choice["guidance"] in (1.0, 1.5) and set(choice["validation"]) == {"1", "1.5"}
    ckpt = load_checkpoint(tmp_path / "demo.pt")
    s = ckpt.config.sampling
    assert (s.steps, s.guidance, s.truncation) == (3, choice["guidance"], 0.9) and ckpt.training is None
    assert s.guidance_range[0] <= s.guidance <= s.guidance_range[1]
    assert ckpt.config.to_dict()["transformer"] == preset("demo").to_dict()["transformer"]

    assert "no training time recorded" in demo()
    again = json.loads((tmp_path / "demo.json").read_text())
    assert not again["from_nothing"] and again["training_seconds"] is None and len(again["kept"]) == 12
