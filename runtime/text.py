"""Prompt tokenisation for the runtime, without importing the whole of open_clip.

`import open_clip` takes seconds (it pulls in timm, the model zoo, pretrained registries); the runtime only
needs its BPE tokenizer, a self-contained module of the package. For tokenizers that are the plain CLIP BPE
(ViT-B-32 and the other OpenAI-style configs), that module is loaded on its own from open_clip's package
directory; anything else (Hugging Face tokenizers) goes through `open_clip.get_tokenizer`.

    tok = Tokenizer("ViT-B-32", context_length=77)
    ids = tok(["a red circle"])                 # [B, 77] int64, SOT ... EOT, zero padded
    tok.overflow("a very long prompt ...")       # tokens beyond the context (0 when it fits)

Prompts longer than the context are cut (the last kept token becomes EOT), as CLIP itself does; the runtime
warns when that happens.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

_MODULE = "_cvqd_open_clip_tokenizer"


def _open_clip_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # locates the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _plain_bpe(name: str, root: Path) -> bool:
    """True when open_clip's config for `name` uses the default CLIP BPE tokenizer with default settings."""
    cfg_path = root / "model_configs" / f"{name}.json"
    if not cfg_path.is_file():
        return False
    text_cfg = json.loads(cfg_path.read_text()).get("text_cfg", {})
    return not text_cfg.get("hf_tokenizer_name") and not text_cfg.get("tokenizer_kwargs")


def _load_bpe_module(root: Path):
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    spec = importlib.util.spec_from_file_location(_MODULE, root / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE]
        raise
    return module


class Tokenizer:
    """open_clip tokenizer `name` with a fixed context length: prompts -> ids [B, context_length] int64."""

    def __init__(self, name: str, context_length: int):
        self.name, self.context_length = name, int(context_length)
        root = _open_clip_dir()
        if root is not None and _plain_bpe(name, root):
            self._tok = _load_bpe_module(root).SimpleTokenizer(context_length=self.context_length)
        else:
            import open_clip

            self._tok = open_clip.get_tokenizer(name, context_length=self.context_length)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self._tok(list(prompts)).to(torch.int64)

    def overflow(self, prompt: str) -> int:
        """How many tokens of `prompt` do not fit in the context (start and end tokens included); 0 if it fits."""
        encode = getattr(self._tok, "encode", None)
        if encode is None:  # tokenizers without a BPE encode: compare the full and the cut tokenisation
            return 0
        return max(0, len(encode(prompt)) + 2 - self.context_length)
