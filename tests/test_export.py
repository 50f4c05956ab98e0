"""Export of a `tiny` checkpoint: parity of every graph, fp16, atomicity, --force, CLI and bad input."""

import contextlib
import io
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cvqd.errors import CvqdError
from cvqd.export import export_plan, validate
from cvqd.export.graphs import build_graph, reference
from cvqd.export.plan_writer import replace_dir
from cvqd.export.validate import TOLERANCES, compare, failures, sample_inputs
from cvqd.model.contracts import COMPONENTS, EXPORTED
from cvqd.model.plan import load_plan


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    from cvqd.model.clipvqd import load_model

    return load_model(tiny_ckpt)


def invoke(*args):
    """In-process run of the `cvqd-export` entry point; -> (exit code, stdout, stderr)."""
    from cvqd.cli_util import run_command
    from cvqd.export.cli import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_command(cli, "cvqd-export", [str(a) for a in args])
    return exc.value.code, out.getvalue(), err.getvalue()


def snapshot(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_every_graph_matches_pytorch_on_fresh_inputs(tiny_plan, tiny_model):
    """Independent of the parity recorded at export: other inputs, a batch size validation did not use."""
    plan = load_plan(tiny_plan)
    gen = torch.Generator().manual_seed(123)
    for name in COMPONENTS:
        contract = plan.contracts[name]
        sess = ort.InferenceSession(str(plan.onnx_path(name)), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [s.name for s in contract.inputs]
        assert all(i.shape[0] == "batch" for i in (*sess.get_inputs(), *sess.get_outputs()))
        inputs = sample_inputs(contract, tiny_model.cfg, 5, gen)
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        ref = reference(name, tiny_model, inputs).numpy()
        metrics = compare(name, got, ref)
        assert not failures(metrics, TOLERANCES["fp32"]), (name, metrics)
        assert metrics["max_rel_err"] < 1e-4
        assert plan.components[name].parity["worst"]["max_rel_err"] < 1e-4


def test_clip_text_on_real_prompts_and_no_data_dependent_gather(tiny_plan, tiny_model):
    plan = load_plan(tiny_plan)
    clip = tiny_model.require_clip()
    ids = clip.tokenize(["a red circle", "", "a very long prompt " * 30])  # empty and cut-off prompts too
    sess = ort.InferenceSession(str(plan.onnx_path("clip_text")), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    ref = clip.encode_text(ids).detach().numpy()
    assert np.abs(got - ref).max() < 1e-5
    ops = {n.op_type for n in onnx.load(str(plan.onnx_path("clip_text"))).graph.node}
    assert "GatherND" not in ops and "ArgMax" in ops  # EOT pooling is a one-hot MatMul, not a gather


def test_prepare_leaves_the_model_untouched(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    g32 = build_graph("transformer", tiny_model, "fp32")
    g16 = build_graph("vq_decoder", tiny_model, "fp16")
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())
    assert type(tiny_model.vqgan.decoder.mid[1]).__name__ == "AttnBlock"  # not swapped in the original
    # fp32 export copies share the weights; fp16 copies keep their norms in fp32
    assert g32.transformer.head.weight.data_ptr() == tiny_model.transformer.head.weight.data_ptr()
    norms = [m for m in g16.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert g16.vqgan.decoder.conv_in.weight.dtype == torch.float16


def test_fp16_plan_through_the_cli_replaces_a_plan_with_force(tiny_ckpt, tiny_plan, tmp_path):
    target = tmp_path / "model.plan"
    shutil.copytree(tiny_plan, target)
    old = snapshot(target)
    code, _, err = invoke("--ckpt", tiny_ckpt, "--out", target, "--precision", "fp16", "-q")
    assert code == 2 and "already exists" in err and "--force" in err and err.count("\n") == 1
    assert snapshot(target) == old

    code, out, err = invoke("--ckpt", tiny_ckpt, "--out", target, "--precision", "fp16", "--force", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["precision"] == "fp16" and set(summary["components"]) == set(EXPORTED)
    assert not leftovers(tmp_path)
    plan = load_plan(target, verify=True)
    assert plan.precision == "fp16"
    for name in COMPONENTS:
        parity = plan.components[name].parity
        assert parity["passed"] and parity["tolerance"] == TOLERANCES["fp16"]
        assert not failures(parity["worst"], TOLERANCES["fp16"])
        assert parity["worst"]["max_rel_err"] > 1e-6  # really fp16 arithmetic, not a copy of the fp32 graph
        model = onnx.load(str(plan.onnx_path(name)))
        dtypes = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in model.graph.initializer}
        assert "float16" in dtypes
        io_types = {onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                    for v in (*model.graph.input, *model.graph.output)}
        assert io_types <= {"int64", "float32"}  # graph boundaries stay int64/float32
    code, _, err = invoke("--plan", target, "--verify")
    assert code == 0 and "fp16" in err


def test_failure_midway_leaves_the_previous_plan_intact(tiny_ckpt, tiny_plan, tmp_path, monkeypatch):
    target = tmp_path / "model.plan"
    shutil.copytree(tiny_plan, target)
    old = snapshot(target)
    seen = []
    real = validate.validate_component
    crash = [RuntimeError]

    def crash_on_second(component, *args, **kwargs):  # clip_text is exported and validated, then a crash
        seen.append(component)
        if len(seen) == 2:
            raise crash[0]("simulated crash during export")
        return real(component, *args, **kwargs)

    monkeypatch.setattr(validate, "validate_component", crash_on_second)
    with pytest.raises(RuntimeError):
        export_plan(tiny_ckpt, target, force=True)
    assert seen == ["clip_text", "clip_image"]
    assert snapshot(target) == old and not leftovers(tmp_path)
    load_plan(target, verify=True)
    # an interrupt (Ctrl-C) without a previous plan: nothing appears at all
    seen.clear()
    crash[0] = KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        export_plan(tiny_ckpt, tmp_path / "fresh.plan")
    assert not (tmp_path / "fresh.plan").exists() and not leftovers(tmp_path)


def test_parity_failure_is_a_clean_error(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(validate.TOLERANCES, "fp32", {**TOLERANCES["fp32"], "max_rel_err": 0.0})
    with pytest.raises(validate.ParityError, match="clip_text .fp32. disagrees with PyTorch: max relative error"):
        export_plan(tiny_ckpt, tmp_path / "p.plan")
    assert list(tmp_path.iterdir()) == []


def test_replace_dir_swaps_whole_directories(tmp_path):
    old, new = tmp_path / "plan", tmp_path / "new"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    replace_dir(new, old)
    assert [p.name for p in old.iterdir()] == ["b"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]


def test_bad_checkpoints_and_targets(tiny_ckpt, tiny_plan, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_ckpt.read_bytes()[:50_000])
    for bad, words in [(text, "not a cvqd checkpoint"), (foreign, "not a cvqd checkpoint"),
                       (truncated, "damaged or truncated PyTorch file"), (tmp_path / "missing.pt", "not found")]:
        code, _, err = invoke("--ckpt", bad, "--out", tmp_path / "out.plan", "-q")
        assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([text.name, foreign.name, truncated.name])

    from cvqd.model.checkpoint import save_checkpoint
    from cvqd.model.clipvqd import load_model

    no_clip = tmp_path / "no-clip.pt"  # like the paper preset: the CLIP comes from a file the user passes
    save_checkpoint(no_clip, load_model(tiny_ckpt).to_checkpoint(include_clip=False))
    code, _, err = invoke("--ckpt", no_clip, "--out", tmp_path / "out.plan", "-q")
    assert code == 2 and "--clip-weights" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.plan").exists() and not leftovers(tmp_path)

    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("do not delete")
    code, _, err = invoke("--ckpt", tiny_ckpt, "--out", tmp_path / "precious", "--force", "-q")
    assert code == 2 and "not a cvqd plan; refusing" in err
    assert (tmp_path / "precious" / "thesis.tex").exists()

    for args, words in [((), "either --ckpt"), (("--ckpt", tiny_ckpt, "--plan", tiny_plan), "either --ckpt"),
                        (("--plan", tiny_plan), "--trt (build engines) or --verify"),
                        (("--plan", tmp_path / "nope", "--verify"), "not found")]:
        code, _, err = invoke(*args)
        assert code == 2 and words in err and err.count("\n") == 1, err
    with pytest.raises(CvqdError, match="unknown precision"):
        export_plan(tiny_ckpt, tmp_path / "x.plan", precision="int8")
