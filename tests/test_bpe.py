"""cvqd.model.bpe: the torch-free CLIP tokenizer gives open_clip's ids exactly, and its file format is robust.

open_clip's own tokenizer is the reference (imported here only, `importorskip`); the module under test must
work, and is checked in a subprocess to work, without torch or open_clip imported.
"""

import gzip
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cvqd.errors import CvqdError
from cvqd.model.bpe import ClipBPE, clean_text, plain_clip_bpe

open_clip = pytest.importorskip("open_clip")

LONG_WORDS = ("the quick brown fox jumps over the lazy dog while a photorealistic oil painting of a lighthouse "
              "at dusk glows under purple clouds, highly detailed, 8k, trending on artstation ")

PROMPTS = [
    # plain
    "a photo of a cat",
    "a red circle on a blue background",
    "A Photo Of A DOG",
    "SHOUTING IN CAPITALS!!!",
    "x",
    # punctuation and symbols
    "hello, world! how are you?",
    "wait... what?!?",
    "$100.00 (approx.) — 50% off; #sale @shop",
    "http://example.com/a?b=c&d=e",
    "snake_case and kebab-case and CamelCase",
    "x² + y² = z², ½ ① ∑ ∞",
    "a</w>b",  # the end-of-word marker written in a prompt is ordinary punctuation
    # numbers: every digit is its own pre-token
    "1234567890",
    "3.14159 and 1,000,000 and 2nd 3rd 42nd",
    # contractions, upper case, quotes
    "it's the dog's bone, isn't it? they're here, we've gone, i'm sure, you'll see, he'd go",
    "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "'s 't 're 've 'm 'll 'd",
    "dogs' toys and 'single quotes' and \"double quotes\"",
    "“curly quotes” and ‘single’ don’t",
    # unicode letters, accents, normalisation
    "naïve café résumé über straße",
    "Ångström ÉCOLE Ça",
    "cafe\u0301 with a combining accent",  # ftfy normalises to NFC: same ids as "café"
    "İstanbul ǅ ﬁnance",  # lower() of İ adds a combining dot; ǅ is title case; ﬁ a ligature
    "a\u0345b ᾳ",  # U+0345: CLIP's case-insensitive pattern drops it
    "Ελληνικά Русский עברית العربية हिन्दी",
    # CJK
    "一只猫坐在桌子上",
    "猫が好きです。カタカナ",
    "고양이 사진",
    # emoji
    "🐱🐶 cute pets 🎨",
    "family 👨‍👩‍👧 and thumbs 👍🏽 and flag 🇫🇷",
    "surrogates \ud83d\ude00 and a lone \ud800 one",  # ftfy joins the pair and replaces the lone one
    # HTML entities (unescaped twice)
    "salt &amp; pepper",
    "salt &amp;amp; pepper",
    "&lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;a&#39; &#x263A; &nbsp;x",
    # mojibake that ftfy repairs
    "cafÃ© crÃ¨me",
    "â€œquotedâ€\x9d textâ€™s",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    # whitespace
    "  a\t\tb\n\nc   d  ",
    "line one\r\nline two\u2028three",
    "ideographic\u3000space and\u00a0nbsp and\u200bzero width",
    "control\x00chars\x07here\x1b[31m",
    # special tokens written literally become the special ids
    "<start_of_text> a cat <end_of_text>",
    "<START_OF_TEXT>x<End_Of_Text>",
    # empty-ish
    "",
    " ",
    "\n\t ",
    "&nbsp;",
    # long: beyond the context
    LONG_WORDS * 5,
    "a " * 75,  # 75 + SOT + EOT = 77: fits exactly
    "a " * 76,  # one too many
    "🎨" * 100,
    "1" * 200,
]


@pytest.fixture(scope="module")
def ref():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tok():
    return ClipBPE.from_open_clip()


def test_prompt_list_is_varied():
    assert len(PROMPTS) >= 40
    assert clean_text("cafÃ© crÃ¨me") == "café crème"  # the mojibake cases do exercise ftfy


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_equal_open_clip(tok, ref, prompt):
    want = ref([prompt]).numpy()
    got = tok([prompt])
    assert got.dtype == np.int64 and got.shape == (1, 77)
    np.testing.assert_array_equal(got, want)
    assert tok.encode(prompt) == ref.encode(prompt)
    assert tok.overflow(prompt) == max(0, len(ref.encode(prompt)) + 2 - 77)


def test_batch_equals_open_clip(tok, ref):
    np.testing.assert_array_equal(tok(PROMPTS), ref(PROMPTS).numpy())
    assert tok([]).shape == (0, 77)
    np.testing.assert_array_equal(tok("a cat"), tok(["a cat"]))  # one string is one prompt, as in open_clip


def test_truncation_and_overflow(tok):
    fits, over = tok(["a " * 75, "a " * 76])
    assert tok.overflow("a " * 75) == 0 and tok.overflow("a " * 76) == 1
    assert fits[0] == tok.sot_id and fits[-1] == tok.eot_id and fits[-2] != tok.eot_id
    assert over[0] == tok.sot_id and over[-1] == tok.eot_id and over[-2] != tok.eot_id
    long = LONG_WORDS * 5
    n = len(tok.encode(long))
    assert n > 100 and tok.overflow(long) == n + 2 - 77
    row = tok([long])[0]
    assert row[-1] == tok.eot_id and list(row[1:-1]) == tok.encode(long)[:75]
    short = tok(["a cat"])[0]
    assert list(short[:4]) == [tok.sot_id, *tok.encode("a cat"), tok.eot_id] and not short[4:].any()


def test_other_context_length_equals_open_clip():
    ref16 = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    tok16 = ClipBPE.from_open_clip(context_length=16)
    np.testing.assert_array_equal(tok16(PROMPTS), ref16(PROMPTS).numpy())
    assert tok16.overflow("a " * 14) == 0 and tok16.overflow("a " * 20) == 6


def test_vocabulary_matches_open_clip(tok, ref):
    assert tok.vocab_size == ref.vocab_size == 49408
    assert (tok.sot_id, tok.eot_id) == (ref.sot_token_id, ref.eot_token_id) == (49406, 49407)
    assert tok.encoder == ref.encoder
    assert tok.ranks == ref.bpe_ranks


def test_explicit_vocabulary_merges_left_to_right():
    """A hand-made tokenizer: the lowest-rank pair merges first, all its occurrences, without overlap."""
    from cvqd.model.bpe import BYTE_TO_CHAR, END_OF_WORD

    alphabet = sorted(BYTE_TO_CHAR.values())
    merges = [("a", "a"), ("b", "c</w>"), ("aa", "bc</w>")]
    vocab = [*alphabet, *(c + END_OF_WORD for c in alphabet), "aa", "bc</w>", "aabc</w>", "<start_of_text>",
             "<end_of_text>"]
    t = ClipBPE(vocab, merges, context_length=8)
    ids = {s: i for i, s in enumerate(vocab)}
    assert t.encode("aaa") == [ids["aa"], ids["a</w>"]]  # "a a a</w>": only the first two can merge
    assert t.encode("aabc") == [ids["aabc</w>"]]
    assert t.encode("AAbc!") == [ids["aabc</w>"], ids["!</w>"]]
    assert t(["aaa aaa aaa aaa"]).tolist() == [[t.sot_id, *([ids["aa"], ids["a</w>"]] * 3), t.eot_id]]


def test_bad_construction_is_cvqd_error(tok):
    with pytest.raises(CvqdError, match="context_length"):
        ClipBPE(tok.vocab, tok.merges, context_length=1)
    with pytest.raises(CvqdError, match="lacks"):
        ClipBPE(tok.vocab[:-1], tok.merges)  # no end_of_text
    with pytest.raises(CvqdError, match="duplicate"):
        ClipBPE(tok.vocab + [tok.vocab[0]], tok.merges)


def test_save_load_round_trip(tok, tmp_path):
    a, b = tmp_path / "a" / "tokenizer.json.gz", tmp_path / "b.json.gz"
    a.parent.mkdir()
    assert tok.save(a) == a
    tok.save(b)
    assert a.read_bytes() == b.read_bytes()  # deterministic: no gzip timestamp, fixed key order
    assert sorted(p.name for p in a.parent.iterdir()) == ["tokenizer.json.gz"]  # no temporary left behind
    loaded = ClipBPE.load(a)
    np.testing.assert_array_equal(loaded(PROMPTS), tok(PROMPTS))
    loaded.save(b)
    assert a.read_bytes() == b.read_bytes()
    obj = json.loads(gzip.decompress(a.read_bytes()))
    assert obj["format"] == "cvqd-clip-bpe" and obj["version"] == 1 and obj["context_length"] == 77
    assert (obj["sot"], obj["eot"]) == ("<start_of_text>", "<end_of_text>")
    assert len(obj["vocab"]) == 49408 and len(obj["merges"]) == 48894 and obj["merges"][0] == ["i", "n"]


def _write_gz(path, obj):
    path.write_bytes(gzip.compress(json.dumps(obj).encode(), mtime=0))
    return path


def _assert_clean_error(path, *fragments):
    with pytest.raises(CvqdError) as info:
        ClipBPE.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for f in fragments:
        assert f in msg, msg
    exc = info.value  # no chained gzip/JSON traceback under the one-line message
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    for raw in ("EOFError", "BadGzipFile", "JSONDecodeError", "Expecting value", "Compressed file ended"):
        assert raw not in msg
    return msg


def test_damaged_or_foreign_files(tok, tmp_path):
    good = tok.save(tmp_path / "tokenizer.json.gz").read_bytes()
    obj = json.loads(gzip.decompress(good))

    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(good[: len(good) // 2])
    _assert_clean_error(cut, "cut short", "cvqd-clip-bpe")

    plain = tmp_path / "plain.json.gz"
    plain.write_text(json.dumps(obj))  # JSON but not compressed
    _assert_clean_error(plain, "not gzip", "gzip-compressed JSON")

    not_json = tmp_path / "text.json.gz"
    not_json.write_bytes(gzip.compress(b"this is not json"))
    _assert_clean_error(not_json, "not JSON")

    _assert_clean_error(_write_gz(tmp_path / "list.json.gz", [1, 2]), "not an object")
    _assert_clean_error(_write_gz(tmp_path / "fmt.json.gz", {**obj, "format": "hf-tokenizers"}), "'hf-tokenizers'")
    _assert_clean_error(_write_gz(tmp_path / "ver.json.gz", {**obj, "version": 2}), "version 2")
    _assert_clean_error(_write_gz(tmp_path / "clean.json.gz", {**obj, "clean": "canonicalize"}), "clean")
    _assert_clean_error(_write_gz(tmp_path / "novocab.json.gz", {k: v for k, v in obj.items() if k != "vocab"}),
                        "'vocab'")
    _assert_clean_error(_write_gz(tmp_path / "short.json.gz", {**obj, "vocab": obj["vocab"][:1000],
                                                                "vocab_size": 1000}), "lacks")
    _assert_clean_error(_write_gz(tmp_path / "merge.json.gz", {**obj, "merges": [["a", "b", "c"]]}), "pair")
    with pytest.raises(CvqdError, match="cannot read tokenizer file"):
        ClipBPE.load(tmp_path / "missing.json.gz")


def test_plain_clip_bpe():
    for name in ("ViT-B-32", "ViT-L-14", "RN50", "coca_ViT-B-32"):
        assert plain_clip_bpe(name), name
        t = open_clip.get_tokenizer(name)  # cross-check: open_clip picks its default BPE, default cleaning
        assert type(t) is open_clip.tokenizer.SimpleTokenizer and t.clean_fn.__name__ == "_clean_lower", name
    for name in ("ViT-B-16-SigLIP", "ViT-H-14-CLIPA", "ViT-L-14-worldwide", "nllb-clip-base-siglip",
                 "no-such-model", "", "hf-hub:timm/ViT-B-16-SigLIP", "local-dir:/tmp", "../model_configs/ViT-B-32"):
        assert not plain_clip_bpe(name), name


def test_no_torch_or_open_clip_imported(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json.gz")
    code = textwrap.dedent(f"""
        import sys
        from cvqd.model.bpe import ClipBPE, plain_clip_bpe
        tok = ClipBPE.load({str(path)!r})
        ids = tok(["a photo of a cat", "naïve café 🐱"])
        assert ids.shape == (2, 77) and ids[0, 0] == 49406
        assert ClipBPE.from_open_clip()(["a photo of a cat"]).tolist() == ids[:1].tolist()
        assert plain_clip_bpe("ViT-B-32")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "torchvision", "timm"))
        assert not bad, bad
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
