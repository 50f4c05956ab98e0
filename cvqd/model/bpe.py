"""CLIP's byte-level BPE tokenizer without torch or open_clip: prompts -> int64 ids, with numpy only.

The runtime has to turn prompts into the ids CLIP's text encoder was trained on, and nothing more; importing
open_clip for that takes seconds and drags in torch. This module reproduces, id for id, open_clip's default
`SimpleTokenizer` (the tokenizer of ViT-B-32 and the other OpenAI-style configs) from an explicit vocabulary and
merge list, which a plan carries in one file (`tokenizer.json.gz`, about 420 KB, see `ClipBPE.save`).

    tok = ClipBPE.load("plan/tokenizer.json.gz")      # or ClipBPE.from_open_clip() where open_clip is installed
    ids = tok(["a red circle"])                       # [B, 77] int64: SOT, BPE ids, EOT, zero padding
    tok.overflow("a very long prompt ...")            # tokens beyond the context (0 when it fits)

How a prompt becomes ids (each step matches CLIP's; the tests compare against open_clip on tricky prompts):
  1. clean: ftfy.fix_text (repairs mojibake, normalises to NFC), HTML-unescape twice (so "&amp;amp;" -> "&"),
     collapse every run of whitespace to one space, strip, lower-case;
  2. pre-tokenize with `PRE_TOKENIZER`: the two special tokens written literally, the contractions 's 't 're 've
     'm 'll 'd, runs of letters, single digits, runs of anything else that is not whitespace;
  3. map each pre-token's UTF-8 bytes to printable characters (`BYTE_TO_CHAR`), so BPE never sees raw bytes;
  4. BPE: split into characters, mark the last with `END_OF_WORD`, then repeatedly merge the adjacent pair of
     lowest merge rank (all its non-overlapping occurrences, left to right) until no adjacent pair is a merge;
  5. frame: [SOT] + ids + [EOT]; longer than the context -> cut to the context and make the last kept id EOT;
     shorter -> pad with 0.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import regex

from cvqd.errors import CvqdError
from cvqd.io import atomic_path

FORMAT = "cvqd-clip-bpe"
VERSION = 1
SOT = "<start_of_text>"
EOT = "<end_of_text>"
END_OF_WORD = "</w>"
DEFAULT_CONTEXT_LENGTH = 77
# Identifiers of the behaviour a version-1 file asks for; `load` refuses a file that names anything else, so a
# tokenizer with another cleaning or pre-tokenizer can never be run silently with this one's rules.
CLEAN = "ftfy-html-whitespace-lower"
BYTE_ENCODING = "gpt2-bytes-to-unicode"
TRUNCATION = "cut-last-is-eot"
PAD_ID = 0
# Pre-token classes after the special tokens (which are put in front, see `_pre_tokenizer`). IGNORECASE is part
# of CLIP's pattern and is kept although the text is lower-cased already, because it changes one character:
# U+0345 (combining Greek iota subscript, a mark whose case folding is the letter iota) then matches neither
# the letter class nor the "anything else" class, so CLIP silently drops it; without the flag it is a token.
PRE_TOKENIZER = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIP keeps only the first 48,894 merges of its vocabulary file: with the 512 byte symbols and the 2 special
# tokens that makes the 49,408 rows of its token embedding.
OPEN_CLIP_MERGES = 49152 - 256 - 2
OPEN_CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The word cache is cleared when it reaches this many entries, so a long-running process fed endless distinct
# words keeps a bounded memory; ordinary prompt vocabularies never get near it.
CACHE_LIMIT = 200_000


def _byte_to_char() -> dict[int, str]:
    """The GPT-2 / CLIP reversible map from the 256 byte values to printable characters.

    Bytes that already are visible, non-space Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (controls, space, NBSP, soft hyphen) get U+0100, U+0101, ... in increasing byte order.
    BPE symbols are thus ordinary strings with no whitespace in them.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    spare = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(spare)
            spare += 1
    return table


BYTE_TO_CHAR = _byte_to_char()
# str.translate table for a pre-token's UTF-8 bytes read as Latin-1 (byte b -> chr(b) -> BYTE_TO_CHAR[b]): one C
# call per word instead of a Python loop over its bytes.
_BYTE_TRANSLATE = dict(BYTE_TO_CHAR)


def clean_text(text: str) -> str:
    """CLIP's prompt cleaning ("lower"): ftfy, HTML-unescape twice, collapse whitespace, strip, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()  # str.split() drops leading/trailing whitespace and splits any run of it


def _pre_tokenizer(specials: Sequence[str]) -> regex.Pattern:
    return regex.compile("|".join([*(regex.escape(s) for s in specials), PRE_TOKENIZER]), regex.IGNORECASE)


class ClipBPE:
    """CLIP byte-level BPE tokenizer from an explicit vocabulary and merge list; id for id open_clip's default.

    vocab: token strings, the index is the id (byte symbols, their END_OF_WORD variants, merge results, specials);
    merges: (left, right) symbol pairs, earlier = merged first; context_length: the row length of `__call__`.
    Raises CvqdError when vocab and merges cannot work together (a merge result, a byte symbol or a special token
    missing from vocab, duplicates), so a damaged file fails at load, never halfway through a prompt.
    """

    def __init__(self, vocab: Sequence[str], merges: Iterable[Sequence[str]],
                 context_length: int = DEFAULT_CONTEXT_LENGTH, sot: str = SOT, eot: str = EOT):
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise CvqdError(f"context_length must be an integer >= 2 (room for start and end of text), "
                            f"got {context_length!r}")
        vocab = list(vocab)
        if not all(isinstance(t, str) and t for t in vocab):
            raise CvqdError("BPE vocabulary entries must be non-empty strings")
        self.vocab: list[str] = vocab
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(vocab)}
        if len(self.encoder) != len(vocab):
            raise CvqdError(f"BPE vocabulary has {len(vocab) - len(self.encoder)} duplicate entries")
        merges = list(merges)
        # Fast path for the ~49k merges of a real vocabulary; the slow loop only runs to name the bad entry.
        try:
            pairs: list[tuple[str, str]] = [(a, b) for a, b in merges]
        except (TypeError, ValueError):
            pairs = []
        if len(pairs) != len(merges) or not all(type(m) is not str and type(a) is str and type(b) is str and a and b
                                                for m, (a, b) in zip(merges, pairs)):
            bad = next((m for m in merges if isinstance(m, str) or not isinstance(m, Sequence) or len(m) != 2
                        or not all(isinstance(x, str) and x for x in m)), merges)
            raise CvqdError(f"BPE merge must be a pair of non-empty strings, got {bad!r}"[:200])
        self.merges: list[tuple[str, str]] = pairs
        self.ranks: dict[tuple[str, str], int] = {p: r for r, p in enumerate(pairs)}
        if len(self.ranks) != len(pairs):
            raise CvqdError(f"BPE merge list has {len(pairs) - len(self.ranks)} duplicate pairs")
        missing = [a + b for a, b in pairs if a + b not in self.encoder]
        missing += [s for c in BYTE_TO_CHAR.values() for s in (c, c + END_OF_WORD) if s not in self.encoder]
        missing += [s for s in (sot, eot) if s not in self.encoder]
        if missing:
            raise CvqdError(f"BPE vocabulary lacks {len(missing)} symbols that merges, bytes or special tokens "
                            f"need (first: {missing[0]!r})")
        self.context_length = context_length
        self.sot, self.eot = sot, eot
        self.sot_id, self.eot_id = self.encoder[sot], self.encoder[eot]
        self._pattern = _pre_tokenizer((sot, eot))
        # Written literally in a prompt, a special token is that token's id (CLIP's pattern matches them first).
        self._special_ids = {sot: (self.sot_id,), eot: (self.eot_id,)}
        # pre-token (as written, before the byte map) -> its BPE ids; the BPE is a pure function of the word
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # ------------------------------------------------------------------------------------------------ encoding

    def _bpe(self, symbols: list[str]) -> list[str]:
        """Merge `symbols` (one word, END_OF_WORD already on the last) by rank until no adjacent pair merges."""
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            left, right = best
            joined = left + right
            out: list[str] = []
            i, n = 0, len(symbols)
            while i < n:  # every non-overlapping occurrence, scanning left to right ("a a a" -> "aa a")
                if i + 1 < n and symbols[i] == left and symbols[i + 1] == right:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        return symbols

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """BPE ids of one pre-token, through the cache."""
        ids = self._cache.get(word)
        if ids is None:
            ids = self._special_ids.get(word)
            if ids is None:
                symbols = list(word.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATE))
                symbols[-1] += END_OF_WORD
                ids = tuple(self.encoder[s] for s in self._bpe(symbols))
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` after CLIP's cleaning, without start/end of text and without any length limit."""
        ids: list[int] = []
        for word in self._pattern.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def overflow(self, prompt: str) -> int:
        """How many tokens of `prompt` (start and end of text counted) do not fit in the context; 0 if it fits."""
        return max(0, len(self.encode(prompt)) + 2 - self.context_length)

    def __call__(self, prompts: Sequence[str] | str) -> np.ndarray:
        """prompts (B strings; one string is one prompt) -> ids [B, context_length] int64.

        Each row is SOT, the prompt's BPE ids, EOT, then zeros. A prompt too long for the context is cut to
        context_length tokens and the last kept one is replaced by EOT, as CLIP does: CLIP's text encoder pools
        at the EOT position (the argmax of the row, EOT being its largest id), so every row must contain one.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        n = self.context_length
        out = np.zeros((len(prompts), n), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            tokens = [self.sot_id, *self.encode(prompt), self.eot_id]
            if len(tokens) > n:
                tokens = tokens[:n]
                tokens[-1] = self.eot_id
            out[row, :len(tokens)] = tokens
        return out

    # ------------------------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object: self-describing, with the vocabulary and merges in full."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "note": "CLIP byte-level BPE tokenizer (open_clip SimpleTokenizer, clean='lower'). Ids index vocab; "
                    "merges are applied lowest index first; rows are sot, ids, eot, zero padding; a prompt longer "
                    "than context_length is cut and its last kept token becomes eot.",
            "context_length": self.context_length,
            "sot": self.sot,
            "eot": self.eot,
            "pad_id": PAD_ID,
            "clean": CLEAN,
            "pre_tokenizer": PRE_TOKENIZER,
            "pre_tokenizer_flags": "IGNORECASE",
            "byte_encoding": BYTE_ENCODING,
            "end_of_word": END_OF_WORD,
            "truncation": TRUNCATION,
            "vocab_size": len(self.vocab),
            "vocab": self.vocab,
            "merges": [list(m) for m in self.merges],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer to `path` as one gzip-compressed JSON file, atomically; -> the path.

        The bytes depend only on the tokenizer (fixed key order, no gzip timestamp or file name), so saving the
        same tokenizer twice gives identical files and plan checksums stay stable.
        """
        path = Path(path)
        text = json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))
        data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClipBPE":
        """Read a file written by `save`; CvqdError (one line) for a missing, damaged or foreign file."""
        path = Path(path)
        expected = f"expected a gzip-compressed JSON tokenizer file with format {FORMAT!r} version {VERSION}"

        def bad(what: str) -> CvqdError:
            return CvqdError(f"{path} is not a usable tokenizer file: {what} ({expected})")

        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CvqdError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from None
        try:
            text = gzip.decompress(raw).decode("utf-8")
        except (OSError, EOFError, zlib.error):  # BadGzipFile is an OSError; a cut file ends early (EOFError)
            raise bad("not gzip data, or cut short") from None
        except UnicodeDecodeError:
            raise bad("decompressed data is not UTF-8 text") from None
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise bad(f"decompressed data is not JSON (line {getattr(exc, 'lineno', '?')})") from None
        if not isinstance(obj, dict):
            raise bad(f"JSON top level is {type(obj).__name__}, not an object")
        if obj.get("format") != FORMAT:
            raise bad(f"format is {obj.get('format')!r}")
        if obj.get("version") != VERSION:
            raise bad(f"unsupported version {obj.get('version')!r}")
        # Behaviour this implementation has: a file asking for any other is refused rather than run differently.
        for key, want in (("clean", CLEAN), ("pre_tokenizer", PRE_TOKENIZER), ("pre_tokenizer_flags", "IGNORECASE"),
                          ("byte_encoding", BYTE_ENCODING), ("end_of_word", END_OF_WORD),
                          ("truncation", TRUNCATION), ("pad_id", PAD_ID)):
            if key in obj and obj[key] != want:
                raise bad(f"{key} is {obj[key]!r}, this tokenizer implements {want!r}")
        for key, kind in (("vocab", list), ("merges", list), ("context_length", int), ("sot", str), ("eot", str)):
            if not isinstance(obj.get(key), kind):
                raise bad(f"{key!r} missing or not a {kind.__name__}")
        if "vocab_size" in obj and obj["vocab_size"] != len(obj["vocab"]):
            raise bad(f"vocab has {len(obj['vocab'])} entries, vocab_size says {obj['vocab_size']}")
        try:
            return cls(obj["vocab"], obj["merges"], obj["context_length"], sot=obj["sot"], eot=obj["eot"])
        except (CvqdError, TypeError) as exc:
            raise bad(str(exc) or type(exc).__name__) from None

    # -------------------------------------------------------------------------------------- from open_clip

    @classmethod
    def from_open_clip(cls, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "ClipBPE":
        """The tokenizer built from open_clip's bundled vocabulary file, as CLIP builds it (open_clip not imported).

        The file is a version line then one merge per line ("a b", most frequent first). CLIP keeps the first
        OPEN_CLIP_MERGES of them; its vocabulary is the 256 byte symbols in code-point order, the same 256 with
        END_OF_WORD appended, the result of every kept merge in rank order, then SOT and EOT.
        """
        root = open_clip_dir()
        if root is None:
            raise CvqdError("open_clip is not installed: it is needed to build the CLIP tokenizer from its "
                            "vocabulary file (or load a saved tokenizer.json.gz instead)")
        path = root / OPEN_CLIP_VOCAB_FILE
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
            raise CvqdError(f"cannot read open_clip's BPE vocabulary {path}: {exc}") from None
        merges = [tuple(line.split()) for line in lines[1:1 + OPEN_CLIP_MERGES]]
        if len(merges) != OPEN_CLIP_MERGES or any(len(m) != 2 for m in merges):
            raise CvqdError(f"{path} is not CLIP's BPE vocabulary: expected a version line and at least "
                            f"{OPEN_CLIP_MERGES} merge lines of two symbols")
        alphabet = sorted(BYTE_TO_CHAR.values())
        vocab = [*alphabet, *(c + END_OF_WORD for c in alphabet), *(a + b for a, b in merges), SOT, EOT]
        return cls(vocab, merges, context_length)


def open_clip_dir() -> Path | None:
    """open_clip's package directory, found without importing it (its __init__ takes seconds); None if absent."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def plain_clip_bpe(name: str) -> bool:
    """True when open_clip's model config `name` tokenizes with the default CLIP BPE and default settings.

    That is what `open_clip.get_tokenizer(name)` does when the config's text_cfg names no Hugging Face tokenizer
    and no tokenizer_kwargs (e.g. clean='canonicalize'), and the name does not make open_clip pick its SigLIP
    tokenizer (any name containing "siglip"). The config is read as a file, without importing open_clip. False
    for names with a schema (hf-hub:, local-dir:), names that are not a plain file name, and unknown models.
    """
    root = open_clip_dir()
    if root is None or not name or ":" in name or "/" in name or "\\" in name or name.startswith("."):
        return False
    if "siglip" in name.lower():
        return False
    try:
        cfg = json.loads((root / "model_configs" / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    text_cfg = cfg.get("text_cfg") if isinstance(cfg, dict) else None
    if not isinstance(text_cfg, dict):
        return False
    return not text_cfg.get("hf_tokenizer_name") and not text_cfg.get("tokenizer_kwargs")
