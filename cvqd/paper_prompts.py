"""The paper's evaluation prompt sets, written as cvqd-run prompt files from the user's own copies of the sources.

    python -m cvqd.paper_prompts ffhq --official CLIPVQDiffusion/ --out ffhq_prompts.txt
    python -m cvqd.paper_prompts coco --captions annotations/captions_val2014.json --count 30000 --out coco.txt

- ffhq: the 64 clip2latent prompts the official repository evaluates FFHQ with, each prefixed "a photograph of "
  as its dataset class does. They are read from the official checkout's
  `image_synthesis/data/utils/clip2latent_text.py` by parsing it (the module is never imported or run).
- coco: `count` captions drawn at random (without replacement, numpy seed `seed`) from the COCO 2014 validation
  caption annotations (`captions_val2014.json`); the paper uses 30,000. Newlines inside captions become spaces.

Nothing is downloaded: both sources are files the user already has.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

import numpy as np

from cvqd.errors import CvqdError
from cvqd.io import atomic_write_bytes

FFHQ_SOURCE = Path("image_synthesis/data/utils/clip2latent_text.py")
FFHQ_LIST = "clip2latent_text_prompt"
FFHQ_PREFIX = "a photograph of "


def ffhq_prompts(official: str | os.PathLike) -> list[str]:
    """The prefixed clip2latent prompts of an official CLIP-VQDiffusion checkout (or of the file itself)."""
    path = Path(official)
    path = path / FFHQ_SOURCE if path.is_dir() else path
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except OSError as exc:
        raise CvqdError(f"cannot read {path}: {exc.strerror or exc} (give the official repository's folder)") from None
    except SyntaxError as exc:
        raise CvqdError(f"{path} is not Python source ({exc.msg}, line {exc.lineno})") from None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == FFHQ_LIST for t in node.targets)
                and isinstance(node.value, ast.List)):
            texts = [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if texts:
                return [FFHQ_PREFIX + t.strip() for t in texts]
    raise CvqdError(f"{path} has no list {FFHQ_LIST} of prompt strings; expected the official repository's file")


def coco_prompts(captions: str | os.PathLike, count: int = 30_000, seed: int = 0) -> list[str]:
    """`count` random captions of a COCO captions annotation file (captions_val2014.json)."""
    path = Path(captions)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CvqdError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CvqdError(f"{path} is not JSON ({exc}); expected COCO's captions_val2014.json") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list) or not anns:
        raise CvqdError(f"{path} has no 'annotations' list; expected COCO's captions_val2014.json")
    texts = [" ".join(str(a.get("caption", "")).split()) for a in anns if isinstance(a, dict)]
    texts = [t for t in texts if t]
    if count < 1 or count > len(texts):
        raise CvqdError(f"count must be in 1..{len(texts)} (the captions in {path}), got {count}")
    pick = np.random.default_rng(seed).choice(len(texts), size=count, replace=False)
    return [texts[i] for i in pick]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cvqd.paper_prompts", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="set", required=True)
    f = sub.add_parser("ffhq", help="the 64 clip2latent prompts (FFHQ)")
    f.add_argument("--official", required=True, help="official CLIP-VQDiffusion checkout (or the prompts file)")
    c = sub.add_parser("coco", help="random COCO 2014 validation captions")
    c.add_argument("--captions", required=True, help="captions_val2014.json")
    c.add_argument("--count", type=int, default=30_000)
    c.add_argument("--seed", type=int, default=0)
    for p in (f, c):
        p.add_argument("--out", required=True, help="prompt file to write (one prompt per line)")
    args = ap.parse_args(argv)
    try:
        prompts = ffhq_prompts(args.official) if args.set == "ffhq" else coco_prompts(args.captions, args.count,
                                                                                        args.seed)
        atomic_write_bytes(args.out, ("\n".join(prompts) + "\n").encode("utf-8"))
    except CvqdError as exc:
        print(f"python -m cvqd.paper_prompts: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(prompts)} prompts to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
