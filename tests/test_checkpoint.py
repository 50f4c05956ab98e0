"""Checkpoint save -> load -> identical outputs; bad files rejected with clear errors."""

import pickle
import zipfile

import pytest
import torch

from cvqd.model.checkpoint import VERSION, load_checkpoint, save_checkpoint
from cvqd.errors import CheckpointError
from cvqd.model.clipvqd import load_model


def outputs(model):
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    tok = torch.randint(0, cfg.transformer.num_classes + 1, (2, cfg.transformer.seq_len), generator=g)
    cond = torch.randn(2, cfg.clip.embed_dim, generator=g)
    with torch.no_grad():
        return (model.transformer(tok, torch.tensor([1, 7]), cond),
                model.vqgan.decode(tok.clamp(max=cfg.transformer.num_classes - 1)),
                model.encode_prompts(["a green triangle"]), model.null_condition())


def test_save_load_identical_outputs(tiny_ckpt, tmp_path):
    a = load_model(tiny_ckpt)
    ckpt = load_checkpoint(tiny_ckpt)
    assert ckpt.stage == "init" and ckpt.config.preset == "tiny" and ckpt.state["clip"] is not None
    path = tmp_path / "again.pt"
    save_checkpoint(path, a.to_checkpoint(step=7, stage="test"))
    b = load_model(path)
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y)
    assert load_checkpoint(path).step == 7


def test_fp16_weights_round_trip(tiny_ckpt, tmp_path):
    a = load_model(tiny_ckpt)
    path = tmp_path / "half.pt"
    save_checkpoint(path, a.to_checkpoint(), weights_dtype=torch.float16)
    ck = load_checkpoint(path)
    assert ck.meta["weights_dtype"] == "float16" and ck.state["vqgan"]["decoder.conv_in.weight"].dtype == torch.float32
    assert path.stat().st_size < tiny_ckpt.stat().st_size * 0.6
    b = load_model(path)
    torch.testing.assert_close(outputs(a)[0], outputs(b)[0], atol=5e-2, rtol=0)


def test_atomic_write_leaves_old_file_on_failure(tiny_ckpt, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"old")
    ck = load_checkpoint(tiny_ckpt)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, ck)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("kind,match", [
    ("missing", "not found"),
    ("text", "not a cvqd checkpoint"),
    ("zip", "a zip archive but not a PyTorch file"),
    ("pickle", "beyond tensors"),
    ("foreign", "expected format"),
    ("newer", "newer than this cvqd"),
    ("badconfig", "invalid model config"),
])
def test_bad_checkpoints_rejected(tiny_ckpt, tmp_path, kind, match):
    path = tmp_path / "bad.pt"
    if kind == "text":
        path.write_text("hello")
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.txt", "y")
    elif kind == "pickle":
        torch.save({"format": "cvqd-checkpoint", "x": Evil()}, path)
    elif kind == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
    elif kind in ("newer", "badconfig"):
        payload = torch.load(tiny_ckpt, weights_only=True)
        if kind == "newer":
            payload["version"] = VERSION + 1
        else:
            payload["config"]["vqgan"]["n_embed"] = 3
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_pickle_payload_never_executes(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out
