"""Turn a training checkpoint into the file users run: no resume state, chosen sampling defaults, fp16 weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cvqd.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cvqd.errors import ConfigError, CvqdError


# The VQGAN parts that turn tokens into pixels; everything else of the VQGAN (encoder, code logits, codebook)
# decides the tokens and must stay as the generator was trained on it.
DECODER_PARTS = ("decoder.", "post_quant_conv.")


def finalize(ckpt: str | os.PathLike, out: str | os.PathLike, *, fp16: bool = False, steps: int | None = None,
             guidance: float | None = None, truncation: float | None = None,
             guidance_range: tuple[float, float] | None = None, notes: dict[str, str] | None = None,
             vqgan_from: str | os.PathLike | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None) -> int:
    """Write `out` from `ckpt` without its `training` state; -> size in bytes.

    Training-run metadata (configs, step counts, data sizes) is kept in `meta`; the optimizer, EMA shadow,
    discriminator and RNG states are dropped. The recorded sampling defaults are what `cvqd-run` uses when no
    flags are given (temperature / top_k / top_p: autoregressive models only).
    `vqgan_from` takes the VQGAN decoder from another checkpoint (one fine-tuned with
    `cvqd-train vqgan --decoder-only`) whose encoder and codebook must equal this one's.
    """
    src = load_checkpoint(ckpt)
    if src.stage in ("init",):
        raise CvqdError(f"{ckpt} is an untrained ({src.stage}) checkpoint; nothing to finalize")
    if vqgan_from is not None:
        src = with_decoder(src, load_checkpoint(vqgan_from), str(vqgan_from))
    s = src.config.sampling
    ar_given = [n for n, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)) if v is not None]
    if ar_given and src.config.ar is None:
        raise CvqdError(f"{', '.join(ar_given)}: sampling defaults of autoregressive models; {ckpt} is a diffusion "
                        f"model")
    if src.config.ar is not None and (steps is not None or truncation is not None):
        raise CvqdError(f"steps and truncation are diffusion defaults; {ckpt} is an autoregressive model (record "
                        f"temperature, top_k, top_p)")
    sampling = s.replace(temperature=s.temperature if temperature is None else temperature,
                         top_k=s.top_k if top_k is None else top_k, top_p=s.top_p if top_p is None else top_p,
                         steps=s.steps if steps is None else steps,
                         guidance=s.guidance if guidance is None else guidance,
                         truncation=s.truncation if truncation is None else truncation,
                         guidance_range=s.guidance_range if guidance_range is None else tuple(guidance_range))
    config = src.config.replace(sampling=sampling)
    try:
        config.sampling.__post_init__()
        config.__post_init__()  # validate the new defaults against the model (steps <= T ...)
    except ConfigError as exc:
        raise CvqdError(f"finalize: {exc}") from None
    meta = {**src.meta, **(notes or {}), "finalized_from": {"stage": src.stage, "step": src.step}}
    save_checkpoint(out, Checkpoint(config, src.state, src.step, src.stage, meta, None),
                    weights_dtype=torch.float16 if fp16 else torch.float32)
    return Path(out).stat().st_size


def with_decoder(model: Checkpoint, donor: Checkpoint, donor_name: str = "the donor") -> Checkpoint:
    """`model` with the VQGAN decoder of `donor`; refuses a donor that would change the tokens.

    The encoder, code logits and codebook are compared at float16 precision, so a float16 (finalized) model
    matches the float32 training checkpoint it came from.
    """
    if donor.config.vqgan != model.config.vqgan:
        raise CvqdError(f"{donor_name}: its VQGAN has a different configuration than the model's; a decoder only "
                        "fits the tokenizer it was trained with")
    ours, theirs = model.state.get("vqgan") or {}, donor.state.get("vqgan") or {}
    if set(ours) != set(theirs):
        raise CvqdError(f"{donor_name}: its VQGAN weights do not match the model's (different parameter names)")
    changed = [k for k in ours if not k.startswith(DECODER_PARTS)
               and not torch.equal(ours[k].half(), theirs[k].half())]
    if changed:
        raise CvqdError(f"{donor_name}: its VQGAN encoder/codebook differ from the model's ({len(changed)} tensors, "
                        f"e.g. {changed[0]}), so its tokens would not be the ones the generator learned; use a "
                        "decoder fine-tuned with `cvqd-train vqgan --decoder-only` from this model's tokenizer")
    vqgan = {k: (theirs[k] if k.startswith(DECODER_PARTS) else v) for k, v in ours.items()}
    meta = {**model.meta, "vqgan_decoder_from": donor_name}
    if "vqgan_decoder_training" in donor.meta:
        meta["vqgan_decoder_training"] = donor.meta["vqgan_decoder_training"]
    return Checkpoint(model.config, {**model.state, "vqgan": vqgan}, model.step, model.stage, meta, model.training)
