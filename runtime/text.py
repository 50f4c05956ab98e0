"""Prompt tokenisation for the runtime: the plan's own CLIP BPE vocabulary, no open_clip, no torch.

A plan exported from a model with the plain CLIP BPE tokenizer (ViT-B-32 and the other OpenAI-style configs)
carries its vocabulary and merges in `tokenizer.json.gz`, read by cvqd/model/bpe.py (numpy + regex + ftfy).
Plans without that file (older exports, or Hugging Face tokenizers) fall back to open_clip's tokenizer, which
needs the `[train]` extra.

    tok = plan_tokenizer(plan)
    ids = tok(["a red circle"])                 # [B, 77] int64 numpy, SOT ... EOT, zero padded
    tok.overflow("a very long prompt ...")       # tokens beyond the context (0 when it fits)

Prompts longer than the context are cut (the last kept token becomes EOT), as CLIP itself does; the runtime
warns when that happens.
"""

from __future__ import annotations

import numpy as np

from cvqd.errors import CvqdError
from cvqd.model.bpe import ClipBPE, open_clip_dir, plain_clip_bpe


class Tokenizer:
    """Prompts -> ids [B, context_length] int64 numpy, from a BPE file or (fallback) open_clip by name."""

    def __init__(self, name: str, context_length: int, vocab_file=None):
        self.name, self.context_length = name, int(context_length)
        self._open_clip = None
        if vocab_file is not None:
            self._bpe = ClipBPE.load(vocab_file)
            if self._bpe.context_length != self.context_length:
                raise CvqdError(f"{vocab_file}: tokenizer context length {self._bpe.context_length} differs from "
                                f"the model's {self.context_length}; re-export the plan")
            return
        if open_clip_dir() is None:
            raise CvqdError(f"this plan has no tokenizer file (tokenizer.json.gz) and open_clip is not installed to "
                            f"tokenize with {name!r}; re-export the plan with this cvqd (cvqd-export), or "
                            f"pip install 'cvqd[train]'")
        if plain_clip_bpe(name):
            self._bpe = ClipBPE.from_open_clip(self.context_length)
        else:
            import open_clip

            self._bpe = None
            self._open_clip = open_clip.get_tokenizer(name, context_length=self.context_length)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        if self._bpe is not None:
            return self._bpe(list(prompts))
        return self._open_clip(list(prompts)).numpy().astype(np.int64)

    def overflow(self, prompt: str) -> int:
        """How many tokens of `prompt` do not fit in the context (start and end tokens included); 0 if it fits."""
        if self._bpe is not None:
            return self._bpe.overflow(prompt)
        encode = getattr(self._open_clip, "encode", None)
        return max(0, len(encode(prompt)) + 2 - self.context_length) if encode else 0


def plan_tokenizer(plan) -> Tokenizer:
    """The tokenizer a plan describes (its vocabulary file when it has one)."""
    return Tokenizer(plan.tokenizer.name, plan.tokenizer.context_length, plan.tokenizer_path())
