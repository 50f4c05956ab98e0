"""Prompt -> images: the Python API under `cvqd-run`.

    from cvqd.runtime.pipeline import Pipeline
    pipe = Pipeline.from_pretrained()                                 # the bundled demo model, ONNX Runtime on CPU
    pipe = Pipeline.from_plan("demo.plan")                            # a plan: ONNX Runtime (auto backend)
    pipe = Pipeline.from_checkpoint("model.pt", device="cuda")        # PyTorch, CUDA graphs + fused kernels
    images = pipe(["a small red circle on the left"], seed=0)         # list of PIL images, parameters in .info
    for g in pipe.iter_generate(["a red circle"], num_images=4, best_of=8, steps=25): ...   # Generated, as made

A `Pipeline` runs the reverse loop (cvqd/model/loop.py, written once) against a `Backend` (runtime/backend.py):
text -> CLIP text embedding -> tokens -> VQ decoder -> images, optionally reranked by CLIP score (best-of-N).
Autoregressive (CLIP-GEN) models run the same way with the token loop of cvqd/model/ar_loop.py instead (settings
guidance, temperature, top_k, top_p instead of steps and truncation); token editing needs a diffusion model.
Image j of a prompt uses seed + j (with best-of-N, its candidates use seed + j*N + c), whatever the batching
and the backend: the noise is a counter-based Philox stream keyed by that seed.

On the CPU with a plan nothing here imports torch: the ONNX Runtime backend works on numpy arrays and the loop's
step math runs in numpy. The torch backend, CUDA graphs and the fused kernels load torch when they are asked for.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from cvqd.errors import CvqdError
from cvqd.images import tag_image, to_pil
from cvqd.io import file_sha256
from cvqd.model.arrays import to_numpy, xp
from cvqd.model.config import ModelConfig
from cvqd.model.loop import ReverseLoop
from cvqd.model.schedule import MaskReplaceSchedule
from cvqd.runtime.backend import BACKENDS, Backend, auto_candidates, is_cuda

Warn = Callable[[str], None]
PlanMaker = Callable[[Path, str], Any]  # (checkpoint, "fp32" | "fp16") -> Plan
MAX_BEST_OF = 256
MAX_SEED = 2 ** 64  # seeds are Philox keys: 64-bit
TRT_UNVERIFIED = ("the tensorrt backend is unverified: no test of this build has run TensorRT engines; compare its "
                  "images with the onnxruntime backend")


def _stderr_warn(msg: str) -> None:
    print(f"cvqd: warning: {msg}", file=sys.stderr)


@dataclass
class Generated:
    image: Image.Image  # its generation parameters are in image.info (and written by image.save)
    prompt: str
    seed: int
    index: int  # image index within its prompt
    params: dict[str, Any]
    position: int = 0  # index in the prompt-major output order


class Pipeline:
    def __init__(self, backend: Backend, config: ModelConfig, null, model_id: str = "", *,
                 kernels: str = "auto", graphs: str | bool = "auto", warn: Warn | None = None):
        self.backend = backend
        self.config = config
        self.warn = warn or _stderr_warn
        self._warned_guidance: set[float] = set()
        self.null = null  # [D], L2-normalised: numpy (plans) or a torch tensor (checkpoints)
        self.model_id = model_id
        dev = backend.device
        self.selection = f"backend {backend.name} on {dev} ({backend.precision})"  # load_pipeline says more
        self.ar = config.generator == "ar"
        if self.ar:
            from cvqd.model.ar_loop import ARLoop

            if kernels == "on":
                raise CvqdError("the fused CUDA sampling kernels are for diffusion models; this is an autoregressive "
                                "(CLIP-GEN) model: use kernels='auto' or 'off'")
            self.schedule = None
            self.loop = ARLoop(backend.ar_prefill, backend.ar_decode, config.ar.num_classes, config.ar.seq_len, dev)
        else:
            self.schedule = MaskReplaceSchedule.from_config(config.diffusion, config.transformer.num_classes,
                                                            device=dev if is_cuda(dev) else None)
            self.loop = ReverseLoop(backend.denoise, self.schedule, config.transformer.seq_len, dev,
                                    kernels=load_kernels(config.transformer.num_classes, dev, kernels, self.warn))
        # autoregressive models: the captured decode step has not run on a GPU yet, so "auto" stays eager
        use_graphs = graphs is True or graphs == "on" or (graphs == "auto" and is_cuda(dev) and not self.ar)
        if use_graphs and (not is_cuda(dev) or not backend.capturable):
            if graphs in (True, "on"):
                raise CvqdError(f"CUDA graphs need a CUDA device and a capturable backend (torch or tensorrt); "
                                f"got {backend.name} on {dev}")
            use_graphs = False
        if use_graphs:
            from cvqd.runtime.cuda_graph import GraphedARLoop, GraphedLoop

            self.loop = GraphedARLoop(self.loop) if self.ar else GraphedLoop(self.loop)

    # ---------------------------------------------------------------------------------- constructors

    @classmethod
    def from_pretrained(cls, backend: str = "auto", device: str | None = None, *, name: str = "demo",
                        warn: Warn | None = None) -> "Pipeline":
        """A bundled demo model (its plan ships inside the package): one call, nothing exported or downloaded.
        name: "demo" (CLIP-VQDiffusion) or "demo-ar" (CLIP-GEN, the autoregressive generator on the same VQGAN and
        CLIP)."""
        return cls.from_plan(load_bundled_plan(name), backend=backend, device=device, warn=warn)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | None = "cpu",
                        clip_weights: str | os.PathLike | None = None, *, precision: str | None = None,
                        kernels: str = "auto", graphs: str | bool = "auto", warn: Warn | None = None) -> "Pipeline":
        """PyTorch backend straight from a `model.pt` (the model package's torch modules)."""
        from cvqd.runtime.backend_torch import torch_backend

        backend, cfg, null, _ = torch_backend(path, device, clip_weights, precision)
        return cls(backend, cfg, null, model_id=file_sha256(path)[:12], kernels=kernels, graphs=graphs, warn=warn)

    @classmethod
    def from_plan(cls, path, backend: str = "auto", device: str | None = None, *, precision: str | None = None,
                  kernels: str = "auto", graphs: str | bool = "auto", warn: Warn | None = None) -> "Pipeline":
        """A plan directory on ONNX Runtime or TensorRT ("auto": the fastest tested backend available here)."""
        from cvqd.model.plan import Plan, load_plan

        plan = path if isinstance(path, Plan) else load_plan(path)
        if backend == "torch":
            raise CvqdError("the torch backend runs a checkpoint, not a plan: use Pipeline.from_checkpoint on "
                            f"the {plan.source.get('checkpoint', 'model.pt')} this plan came from")
        return load_pipeline(plan=plan, backend=backend, device=device, precision=precision, kernels=kernels,
                             graphs=graphs, warn=warn)

    # ------------------------------------------------------------------------------------------ API

    def describe(self) -> dict[str, Any]:
        """What runs where: backend, device, execution provider or precision, step implementation."""
        return {"backend": self.backend.name, "device": str(self.backend.device),
                "precision": self.backend.precision, "step": getattr(self.loop, "step_impl", "torch"),
                "model": self.model_id, **{k: v for k, v in self.backend.info.items() if k == "execution_provider"}}

    def resolve(self, steps: int | None = None, guidance: float | None = None, truncation: float | None = None,
                temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None) -> dict[str, Any]:
        """Sampling settings with the model's defaults filled in, validated: steps, guidance, truncation (diffusion)
        or guidance, temperature, top_k, top_p (autoregressive)."""
        return resolve_settings(self.config, steps, guidance, truncation, temperature, top_k, top_p)

    def _require_diffusion(self, what: str) -> None:
        if self.ar:
            raise CvqdError(f"{what} needs a diffusion model; this is an autoregressive (CLIP-GEN) model, which "
                            f"generates tokens in raster order (prompts, variations, interpolations and text diffs "
                            f"work)")

    def check_batch(self, batch_size: int) -> None:
        limit = self.backend.max_batch
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CvqdError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if limit is not None and batch_size > limit:
            raise CvqdError(f"batch_size {batch_size} is above this plan's maximum of {limit} images per batch "
                            f"(its graphs' max batch); use batch_size <= {limit}, or re-export the plan with a "
                            f"larger max")

    def encode_prompts(self, prompts: list[str]):
        """CLIP text embeddings [B, D] (L2-normalised); prompts longer than the context are cut, with a warning."""
        if self.backend.overflow is not None:
            for p in dict.fromkeys(prompts):
                extra = self.backend.overflow(p)
                if extra:
                    self.warn(f"prompt {p[:40]!r}{'...' if len(p) > 40 else ''} is {extra} token(s) longer than the "
                              f"CLIP context; it was truncated")
        emb = self.backend.encode_text(self.backend.tokenize(prompts))
        return xp(emb).float32(emb)

    # ------------------------------------------------------------------------- conditions beyond text

    def _to_backend(self, arr):
        """A numpy array as the backend's kind of array (torch tensors on its device for torch and CUDA)."""
        if self.backend.name == "onnxruntime" and not is_cuda(self.backend.device):
            return arr
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.backend.device)

    def encode_images(self, images) -> np.ndarray:
        """CLIP image embeddings [B, D] (L2-normalised, numpy) of PIL images or image files (any size: CLIP's
        preprocessing resizes them; RGBA and greyscale are converted to RGB)."""
        if self.backend.encode_image is None:
            raise CvqdError(f"image conditions need a CLIP image encoder, which the {self.backend.name} backend "
                            f"lacks")
        # one image at a time: sizes may differ (CLIP's preprocessing resizes each, non-square ones squeezed)
        emb = np.concatenate([to_numpy(self.backend.encode_image(self._to_backend(image_array(im)[None])))
                              .astype(np.float32) for im in images])
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def condition(self, source) -> np.ndarray:
        """One condition [D] (unit length) from a prompt (str) or an image (a PIL image or a path to an image
        file): the CLIP text or image embedding, the two spaces CLIP aligns."""
        if isinstance(source, str) and source.lower().endswith(IMAGE_SUFFIXES) and not Path(source).is_file():
            raise CvqdError(f"image not found: {source} (a condition ending in an image extension is read as a file)")
        if isinstance(source, str) and not _looks_like_image_path(source):
            return to_numpy(self.encode_prompts(validate_prompts([source]))).astype(np.float32)[0]
        return self.encode_images([source])[0]

    def generate_from(self, conditions: np.ndarray, labels: list[str], *, seed: int = 0,
                      index: list[int] | None = None,
                      steps: int | None = None, guidance: float | None = None, truncation: float | None = None,
                      temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                      batch_size: int = 8, best_of: int | None = None, extra: list[dict] | None = None,
                      fixed: tuple[np.ndarray, np.ndarray] | None = None,
                      renoise: tuple[np.ndarray, int] | None = None,
                      callback: Callable[[int, int], None] | None = None) -> Iterator[Generated]:
        """Images from explicit conditions [M, D] (any unit vectors in CLIP space), one per row, in order. Row m is
        image index[m] (default m) and uses seed + index[m] (with best_of = N: candidates seed + index[m] * N + c, as
        `iter_generate`); interpolation frames share index 0, so one seed runs through the sequence. `labels` name
        each row in the parameters; `extra` adds per-row parameters. best-of reranks by cosine with the row's
        condition.
        `fixed`: (x0 [M, N] int64, keep [M, N] bool): row m's tokens are held at x0 where keep (editing).
        `renoise`: (x0 [M, N] int64, start_t): a global edit, each row starting from its x0 noised to start_t.
        Autoregressive models take temperature / top_k / top_p instead of steps / truncation."""
        if fixed is not None or renoise is not None:
            self._require_diffusion("token editing" if fixed is not None else "a global edit")
        conditions = np.asarray(conditions, dtype=np.float32)
        if conditions.ndim != 2 or conditions.shape[0] < 1:
            raise CvqdError(f"conditions must be a [M, D] array with M >= 1, got shape {list(conditions.shape)}")
        M = conditions.shape[0]
        index = list(range(M)) if index is None else [int(i) for i in index]
        if len(labels) != M or len(index) != M:
            raise CvqdError(f"{M} conditions need {M} labels and image indices, got {len(labels)} and {len(index)}")
        best_of = self.config.sampling.best_of if best_of is None else best_of
        if isinstance(best_of, bool) or not isinstance(best_of, int) or not 1 <= best_of <= MAX_BEST_OF:
            raise CvqdError(f"best_of must be an integer in 1..{MAX_BEST_OF}, got {best_of!r}")
        check_seed(seed, (max(index) + 1) * best_of)
        self.check_batch(batch_size)
        settings = self.resolve(steps, guidance, truncation, temperature, top_k, top_p)
        self._note_guidance(settings["guidance"])
        jobs = [(m, c, seed + index[m] * best_of + c) for m in range(M) for c in range(best_of)]
        per_batch = self.config.ar.seq_len if self.ar else settings["steps"]  # tokens or reverse steps
        if renoise is not None:  # only the strided steps at or below the start run
            per_batch = sum(1 for t, _ in self.schedule.strided_steps(settings["steps"]) if t <= renoise[1])
        done, total = 0, per_batch * math.ceil(len(jobs) / batch_size)
        if callback is not None:
            callback(0, total)
        best: dict[int, Generated] = {}
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            step_cb = None if callback is None else (lambda i, n, base=done: callback(base + i, total))
            rows = [m for m, *_ in batch]
            cond = conditions[rows]
            hold = None if fixed is None else (fixed[0][rows], fixed[1][rows])
            start = None if renoise is None else (renoise[0][rows], int(renoise[1]))
            try:
                tokens = self.sample_tokens(self._to_backend(cond), [s for *_, s in batch], callback=step_cb,
                                            fixed=hold, renoise=start, **settings)
                pixels = self.backend.decode(tokens)
                scores = self.clip_scores(pixels, cond) if best_of > 1 else [None] * len(batch)
            except Exception as exc:
                self._raise_if_oom(exc, len(batch), settings["guidance"])
                raise
            done += per_batch
            for (m, c, s), im, score in zip(batch, to_pil(pixels), scores):
                params = {"prompt": labels[m], "seed": s, **settings, "model": self.model_id,
                          "backend": self.backend.name, "preset": self.config.preset, **((extra or [{}] * M)[m])}
                if best_of > 1:
                    params.update(best_of=best_of, clip_score=round(float(score), 6))
                if m not in best or score > best[m].params["clip_score"]:
                    best[m] = Generated(im, labels[m], s, c, params)
                if c == best_of - 1:
                    g = best.pop(m)
                    g.index, g.position = index[m], m
                    tag_image(g.image, g.params)
                    yield g

    def variation_jobs(self, image, *, num_images: int = 4, seed: int = 0) -> dict[str, Any]:
        """What `variations` samples: the image's CLIP embedding, num_images times (image j: seed + j)."""
        _check_count(num_images)
        emb = self.condition(image if not isinstance(image, str) else Path(image))
        label = f"variation of {_describe(image)}"
        return {"conditions": np.repeat(emb[None], num_images, 0), "labels": [label] * num_images,
                "seed": seed, "index": list(range(num_images)),
                "extra": [{"mode": "variation", "source": _describe(image)}] * num_images}

    def interpolation_jobs(self, start, end, *, frames: int = 8, seed: int = 0) -> dict[str, Any]:
        """What `interpolate` samples: `frames` conditions along the great circle, one seed for all frames."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise CvqdError(f"frames must be an integer >= 2, got {frames!r}")
        a, b = self.condition(start), self.condition(end)
        ts = [i / (frames - 1) for i in range(frames)]
        return {"conditions": np.stack([slerp(a, b, t) for t in ts]),
                "labels": [f"{_describe(start)} to {_describe(end)} at {t:.3f}" for t in ts], "seed": seed,
                "index": [0] * frames,
                "extra": [{"mode": "interpolation", "from": _describe(start), "to": _describe(end),
                           "t": round(t, 6)} for t in ts]}

    def text_diff_jobs(self, image, source: str, target: str, *, strength: float = 0.5, num_images: int = 1,
                       seed: int = 0) -> dict[str, Any]:
        """What `text_diff` samples: the image's embedding rotated toward the source -> target text direction."""
        _check_count(num_images)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise CvqdError(f"strength must be a number in [0, 1], got {strength!r}")
        img = self.condition(image if not isinstance(image, str) else Path(image))
        src, tgt = (self.condition(validate_prompts([t])[0]) for t in (source, target))
        direction = tgt - src
        norm = float(np.linalg.norm(direction))
        if norm < 1e-6:
            raise CvqdError(f"source and target texts have the same CLIP embedding ({source!r}, {target!r}); "
                            f"give two different descriptions")
        cond = slerp(img, direction / norm, float(strength))
        label = f"{_describe(image)} from {source} to {target} x {strength:g}"
        extra = {"mode": "text_diff", "source_image": _describe(image), "from": source, "to": target,
                 "strength": float(strength)}
        return {"conditions": np.repeat(cond[None], num_images, 0), "labels": [label] * num_images,
                "seed": seed, "index": list(range(num_images)), "extra": [extra] * num_images}

    def variations(self, image, *, num_images: int = 4, seed: int = 0, **kwargs) -> list[Generated]:
        """Images conditioned on the CLIP image embedding of `image` (a PIL image or a path): image j uses seed + j.
        kwargs: steps, guidance, truncation, batch_size, best_of, callback (as `generate`)."""
        return list(self.generate_from(**self.variation_jobs(image, num_images=num_images, seed=seed), **kwargs))

    def interpolate(self, start, end, *, frames: int = 8, seed: int = 0, **kwargs) -> list[Generated]:
        """`frames` images along the great circle from `start` to `end` (each a prompt or an image), all with the
        same seed so the sequence changes smoothly; frame 0 is `start`'s condition, the last `end`'s."""
        return list(self.generate_from(**self.interpolation_jobs(start, end, frames=frames, seed=seed), **kwargs))

    def text_diff(self, image, source: str, target: str, *, strength: float = 0.5, num_images: int = 1,
                  seed: int = 0, **kwargs) -> list[Generated]:
        """Move `image` toward a text: rotate its CLIP image embedding toward the direction from the `source`
        text's embedding to the `target` text's (unCLIP's text diff), by `strength` in [0, 1] along the great
        circle (0: the image's own embedding)."""
        jobs = self.text_diff_jobs(image, source, target, strength=strength, num_images=num_images, seed=seed)
        return list(self.generate_from(**jobs, **kwargs))

    def encode_tokens(self, images) -> np.ndarray:
        """VQ tokens [B, N] (numpy) of PIL images or image files, resized to the model's resolution first."""
        if self.backend.encode_tokens is None:
            if self.backend.name != "onnxruntime":
                raise CvqdError(f"token editing needs the VQ encoder, which the {self.backend.name} backend does not "
                                f"run; use the onnxruntime or the torch backend")
            raise CvqdError(f"token editing needs the VQ encoder, which this {self.backend.name} plan lacks (it was "
                            f"exported before plans carried one): re-export it with cvqd-export --force, or use the "
                            f"torch backend with the checkpoint")
        R = self.config.vqgan.resolution
        arrays = []
        for im in images:
            pil = _load_image(im)
            if pil.size != (R, R):
                pil = pil.convert("RGB").resize((R, R), Image.BICUBIC)
            arrays.append(image_array(pil))
        out = self.backend.encode_tokens(self._to_backend(np.stack(arrays)))
        return to_numpy(out).astype(np.int64)

    def edit_jobs(self, image, mask, prompt, *, num_images: int = 1, seed: int = 0) -> dict[str, Any]:
        """What `edit` samples: the image's tokens held outside `mask`, the prompt's condition (image j: seed + j)."""
        _check_count(num_images)
        self._require_diffusion("token editing")
        keep = ~token_region(mask, self.config.vqgan.resolution, tuple(self.config.transformer.grid))
        x0 = self.encode_tokens([image])[0]
        cond = self.condition(validate_prompts([prompt])[0])
        label = f"{prompt} in {_describe(mask) if not isinstance(mask, str) else mask} of {_describe(image)}"
        extra = {"mode": "edit", "source_image": _describe(image), "mask": str(mask) if isinstance(mask, str) else
                 _describe(mask), "regenerated_tokens": int((~keep).sum())}
        return {"conditions": np.repeat(cond[None], num_images, 0), "labels": [label] * num_images,
                "seed": seed, "index": list(range(num_images)), "extra": [extra] * num_images,
                "fixed": (np.repeat(x0[None], num_images, 0), np.repeat(keep[None], num_images, 0))}

    def renoise_jobs(self, image, prompt: str, *, strength: float = 0.5, num_images: int = 1,
                     seed: int = 0) -> dict[str, Any]:
        """What `edit_global` samples: the image's tokens noised to t = strength (T - 1), then denoised for the
        prompt (image j uses seed + j for both the noising and the sampling)."""
        _check_count(num_images)
        self._require_diffusion("a global edit")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise CvqdError(f"strength must be a number in (0, 1] (the fraction of the diffusion to redo), got "
                            f"{strength!r}")
        start_t = max(0, round(float(strength) * (self.config.diffusion.num_steps - 1)))
        x0 = self.encode_tokens([image])[0]
        cond = self.condition(validate_prompts([prompt])[0])
        extra = {"mode": "global_edit", "source_image": _describe(image), "strength": float(strength),
                 "start_t": start_t}
        return {"conditions": np.repeat(cond[None], num_images, 0),
                "labels": [f"{prompt} from {_describe(image)} x {strength:g}"] * num_images,
                "seed": seed, "index": list(range(num_images)), "extra": [extra] * num_images,
                "renoise": (np.repeat(x0[None], num_images, 0), start_t)}

    def edit_global(self, image, prompt: str, *, strength: float = 0.5, num_images: int = 1, seed: int = 0,
                    **kwargs) -> list[Generated]:
        """A global edit: re-noise the whole image to step t = strength (T - 1) (x_t ~ q(x_t | x_0) of its tokens)
        and denoise from there for `prompt`: small strengths keep the layout, 1 is a fresh sample."""
        jobs = self.renoise_jobs(image, prompt, strength=strength, num_images=num_images, seed=seed)
        return list(self.generate_from(**jobs, **kwargs))

    def edit(self, image, mask, prompt: str, *, num_images: int = 1, seed: int = 0, **kwargs) -> list[Generated]:
        """Token-space editing (inpainting): the image's VQ tokens outside `mask` stay fixed at every step, the
        tokens inside are generated for `prompt`. mask: "left" / "right" / "top" / "bottom" / "center", a pixel box
        "x0,y0,x1,y1", or a mask image (white = regenerate); a token is regenerated when its cell touches it."""
        return list(self.generate_from(**self.edit_jobs(image, mask, prompt, num_images=num_images, seed=seed),
                                       **kwargs))

    def sample_tokens(self, cond, seeds: list[int], steps: int | None = None, guidance: float = 1.0,
                      truncation: float | None = None, callback: Callable[[int, int], None] | None = None,
                      fixed=None, renoise=None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        """x_0 tokens [B, N] for conditions [B, D]; row b's noise is the Philox stream keyed by seeds[b].
        `fixed`: (x0, keep) numpy [B, N]: tokens held at x0 where keep; `renoise`: (x0 [B, N], start_t): a global
        edit (see ReverseLoop.run). Autoregressive models: guidance, temperature, top_k, top_p."""
        if self.ar:
            return self.loop.run(cond, self.null, [int(s) for s in seeds], guidance=guidance,
                                 temperature=temperature, top_k=top_k, top_p=top_p, callback=callback)
        kw = {k: v for k, v in (("fixed", fixed), ("renoise", renoise)) if v is not None}
        return self.loop.run(cond, self.null, [int(s) for s in seeds], steps=steps, guidance=guidance,
                             truncation=truncation, callback=callback, **kw)

    def clip_scores(self, images, text_emb) -> list[float]:
        """Cosine between each image's CLIP embedding and its prompt's text embedding: [B] floats."""
        if self.backend.encode_image is None:
            raise CvqdError(f"best-of-N needs a CLIP image encoder, which the {self.backend.name} backend lacks")
        img = to_numpy(self.backend.encode_image(images)).astype("float32")
        return (img * to_numpy(text_emb).astype("float32")).sum(-1).tolist()

    def generate(self, prompts: list[str], **kwargs) -> list[Generated]:
        """Images for every prompt, prompt-major (see `iter_generate` for the arguments)."""
        return list(self.iter_generate(prompts, **kwargs))

    def iter_generate(self, prompts: list[str], *, seed: int = 0, num_images: int = 1, steps: int | None = None,
                      guidance: float | None = None, truncation: float | None = None, batch_size: int = 8,
                      best_of: int | None = None, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None,
                      callback: Callable[[int, int], None] | None = None) -> Iterator[Generated]:
        """Yield each image as soon as it is final, in prompt-major order.

        Image j of a prompt uses seed + j; with best_of = N > 1 it is the best (by CLIP text-image cosine) of N
        candidates with seeds seed + j*N + c, c = 0..N-1 (None: the model's default, `sampling.best_of`).
        `callback(done, total)` counts reverse steps over the whole request (total known from the start).
        """
        prompts = validate_prompts(prompts)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise CvqdError(f"num_images must be an integer >= 1, got {num_images!r}")
        yield from self.generate_from(self.prompt_conditions([p for p in prompts for _ in range(num_images)]),
                                      [p for p in prompts for _ in range(num_images)], seed=seed,
                                      index=[j for _ in prompts for j in range(num_images)], steps=steps,
                                      guidance=guidance, truncation=truncation, batch_size=batch_size,
                                      best_of=best_of, temperature=temperature, top_k=top_k, top_p=top_p,
                                      callback=callback)

    def guidance_note(self, guidance: float) -> str | None:
        """A one-line warning when `guidance` lies outside the range the model was validated at, else None."""
        rng = self.config.sampling.guidance_range
        if not rng or rng[0] <= guidance <= rng[1]:
            return None
        return (f"guidance {guidance:g} is outside {rng[0]:g}-{rng[1]:g}, the range this model's prompt following "
                f"was validated at (default {self.config.sampling.guidance:g}); images may lose the prompt or turn "
                f"to noise")

    def _note_guidance(self, guidance: float) -> None:
        note = self.guidance_note(guidance)
        if note is not None and guidance not in self._warned_guidance:
            self._warned_guidance.add(guidance)
            self.warn(note)

    def prompt_conditions(self, prompts: list[str]) -> np.ndarray:
        """Text embeddings [len(prompts), D] float32, one row per entry; each distinct prompt is encoded once, in
        chunks of the text graph's batch limit."""
        unique = list(dict.fromkeys(prompts))
        chunk = self.backend.max_batch or 8
        emb = np.concatenate([to_numpy(self.encode_prompts(unique[i:i + chunk])).astype(np.float32)
                              for i in range(0, len(unique), chunk)])
        row = {p: emb[i] for i, p in enumerate(unique)}
        return np.stack([row[p] for p in prompts])

    def _raise_if_oom(self, exc: BaseException, images: int, guidance: float) -> None:
        """An out-of-memory failure of a batch as a one-line CvqdError saying what to lower."""
        if not _is_oom(exc):
            return
        _free_cuda()
        gpu = is_cuda(self.backend.device) or type(exc).__name__ == "OutOfMemoryError"
        rows = images * (2 if guidance != 1 else 1)
        raise CvqdError(f"a batch of {images} image(s) does not fit in {'GPU' if gpu else 'host'} memory ({rows} "
                        f"transformer rows per step); use a smaller batch_size") from None

    def __call__(self, prompts: str | list[str], **kwargs) -> list[Image.Image]:
        return [g.image for g in self.generate([prompts] if isinstance(prompts, str) else prompts, **kwargs)]


BUNDLED_FIX = "reinstall cvqd (pip install --force-reinstall cvqd)"


def load_bundled_plan(name: str = "demo"):
    """A demo plan shipped in the package, every file's sha256 checked (a few milliseconds)."""
    from cvqd.model.plan import PlanError, load_plan
    from cvqd.paths import bundled_plan

    path = bundled_plan(name)
    if not (path / "manifest.json").is_file():
        raise PlanError(f"the bundled demo plan {path} is missing from this install; {BUNDLED_FIX}")
    try:
        plan = load_plan(path)
    except PlanError as exc:
        raise PlanError(f"the bundled demo plan is damaged ({str(exc).split(';')[0]}); {BUNDLED_FIX}") from None
    plan.rebuild_hint = BUNDLED_FIX
    plan.verify()
    return plan


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def _check_count(num_images) -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise CvqdError(f"num_images must be an integer >= 1, got {num_images!r}")


def _looks_like_image_path(text: str) -> bool:
    return text.lower().endswith(IMAGE_SUFFIXES) and Path(text).is_file()


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name if not isinstance(source, str) or _looks_like_image_path(source) else source
    return getattr(source, "filename", "") and Path(source.filename).name or "an image"


REGIONS = ("left", "right", "top", "bottom", "center")


def token_region(mask, resolution: int, grid: tuple[int, int]) -> np.ndarray:
    """[N] bool: the tokens to regenerate for a mask given as a named region, a pixel box "x0,y0,x1,y1" (x1, y1
    exclusive) or a mask image (white = regenerate, resized to the model's resolution); a token is selected when its
    cell touches the region. CvqdError for bad syntax, a box outside the image, or a mask selecting nothing."""
    H, W = grid
    R = resolution
    px = np.zeros((R, R), dtype=bool)
    if isinstance(mask, str) and mask.strip().lower() in REGIONS:
        h = R // 2
        region = mask.strip().lower()
        if region == "left":
            px[:, :h] = True
        elif region == "right":
            px[:, h:] = True
        elif region == "top":
            px[:h, :] = True
        elif region == "bottom":
            px[h:, :] = True
        else:
            px[R // 4:R - R // 4, R // 4:R - R // 4] = True
    elif isinstance(mask, str) and not _looks_like_image_path(mask):
        parts = mask.replace(" ", "").split(",")
        try:
            x0, y0, x1, y1 = (int(p) for p in parts)
        except ValueError:
            raise CvqdError(f"mask {mask!r} is not a region: expected one of {list(REGIONS)}, a pixel box "
                            f"x0,y0,x1,y1 or a mask image file") from None
        if not (0 <= x0 < x1 <= R and 0 <= y0 < y1 <= R):
            raise CvqdError(f"mask box {mask!r} is empty or outside the {R}x{R} image (need 0 <= x0 < x1 <= {R} and "
                            f"0 <= y0 < y1 <= {R})")
        px[y0:y1, x0:x1] = True
    else:
        img = _load_image(mask).convert("L").resize((R, R), Image.NEAREST)
        px = np.asarray(img) > 127
    cells = px.reshape(H, R // H, W, R // W).any(axis=(1, 3)).reshape(-1)
    if not cells.any():
        raise CvqdError(f"mask {_describe(mask) if not isinstance(mask, str) else mask!r} selects no pixel of the "
                        f"image: nothing to edit")
    return cells


def _load_image(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise CvqdError(f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError):
        raise CvqdError(f"{path} is not a readable image (expected PNG, JPEG or another format Pillow "
                        f"reads)") from None


def image_array(source) -> np.ndarray:
    """A PIL image or an image file -> [3, H, W] float32 in [-1, 1] (RGB; CvqdError for unreadable files)."""
    if isinstance(source, (str, os.PathLike)):
        source = _load_image(source)
    if not isinstance(source, Image.Image):
        raise CvqdError(f"expected a PIL image or an image path, got {type(source).__name__}")
    rgb = np.asarray(source.convert("RGB"), dtype=np.float32)
    return (rgb.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation between the directions of a and b (unit result); t = 0 gives a, t = 1 gives b."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    omega = float(np.arccos(np.clip(np.dot(a, b), -1.0, 1.0)))
    if omega < 1e-6:
        out = a
    else:
        out = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    return (out / np.linalg.norm(out)).astype(np.float32)


def check_seed(seed: int, count: int = 1) -> None:
    """Seeds are 64-bit Philox keys: seed .. seed + count - 1 must lie in [0, 2^64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - count:
        top = MAX_SEED - count
        raise CvqdError(f"seed must be an integer in [0, {top}] (64-bit; this request uses {count} consecutive "
                        f"seed(s) per prompt), got {seed!r}")


# ------------------------------------------------------------------------------------------ building

def load_kernels(num_classes: int, device, mode: str = "auto", warn: Callable[[str], None] | None = None):
    """The fused kernels for a CUDA device, or None for the array step (numpy on the CPU, torch on a GPU).

    mode "auto": kernels on CUDA when NVRTC can build them, else a warning and the torch step (the fallback);
    "on": kernels or an error; "off": the array step.
    """
    if mode == "off" or not is_cuda(device):
        if mode == "on":
            raise CvqdError(f"kernels='on' needs a CUDA device, got {device}")
        return None
    try:
        from cvqd.kernels.sampling import SamplingKernels

        return SamplingKernels(num_classes, device)
    except Exception as exc:  # NVRTC missing, unsupported arch, driver errors: fall back, loudly
        if mode == "on":
            raise
        (warn or _stderr_warn)(
            f"fused CUDA sampling kernels unavailable ({str(exc).splitlines()[0]}); using the PyTorch step")
        return None


def load_pipeline(*, plan=None, ckpt: str | os.PathLike | None = None, backend: str = "auto", device: str | None = None,
                  precision: str | None = None, clip_weights: str | os.PathLike | None = None, kernels: str = "auto",
                  graphs: str | bool = "auto", warn: Warn | None = None,
                  plan_for: PlanMaker | None = None) -> Pipeline:
    """Build a Pipeline from a plan and/or a checkpoint with a named backend or "auto".

    `plan`: a Plan (or None); `ckpt`: a checkpoint path (or None). A plan backend given only a checkpoint asks
    `plan_for(ckpt, precision)` for its plan; the runtime itself never exports (`cvqd-run` passes the export
    package's plan cache, cvqd.export.cache.cached_plan). The returned pipeline's `selection` says which backend
    was picked and why (the CLI prints it on stderr).
    """
    if backend not in BACKENDS:
        raise CvqdError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if plan is None and ckpt is None:
        raise CvqdError("nothing to run: give a plan directory or a checkpoint")
    if ckpt is not None and not Path(ckpt).is_file():
        raise CvqdError(f"checkpoint not found: {ckpt}")
    if device is not None and str(device) != "cpu":
        from cvqd.runtime.backend_torch import torch_device

        device = str(torch_device(device))  # CvqdError for unknown devices or a GPU that is not there
    warn = warn or _stderr_warn
    if backend != "auto":
        # defaults: TensorRT needs the GPU; ONNX Runtime runs on the CPU unless told; torch takes a GPU if present
        dev = device or {"tensorrt": "cuda", "onnxruntime": "cpu", "torch": None}[backend]
        pipe = _build(backend, dev, plan, ckpt, precision, clip_weights, kernels, graphs, warn, plan_for)
        if backend == "tensorrt":
            warn(TRT_UNVERIFIED)
        return pipe
    skipped = []
    candidates = auto_candidates(have_plan=plan is not None or (ckpt is not None and plan_for is not None),
                                 have_ckpt=ckpt is not None, device=device)
    if not candidates:
        raise CvqdError(f"no backend can run on device {device!r} with what was given")
    from cvqd.model.plan import PlanError

    for name, dev in candidates:
        try:
            pipe = _build(name, dev, plan, ckpt, precision, clip_weights, kernels, graphs, warn, plan_for)
        except CvqdError as exc:
            # a damaged plan is the user's to fix (its message names the command that rebuilds it): never hidden
            # behind a silent fall back to a slower backend
            if (name, dev) == candidates[-1] or isinstance(exc, PlanError):
                raise
            skipped.append(f"{name} on {dev}: {str(exc).splitlines()[0]}")
            continue
        d = pipe.describe()
        extra = f", {d['execution_provider']}" if "execution_provider" in d else ""
        pipe.selection = (f"backend auto picked {name} on {dev} ({d['precision']}{extra}, step: {d['step']})"
                          + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
        return pipe
    raise AssertionError("unreachable")


def _build(name, device, plan, ckpt, precision, clip_weights, kernels, graphs, warn, plan_for):
    if name == "torch":
        if ckpt is None:
            raise CvqdError("the torch backend runs a checkpoint, not a plan: pass ckpt=<the checkpoint> (the plan "
                            f"was exported from {plan.source.get('checkpoint', 'a checkpoint')})")
        digest = file_sha256(ckpt)
        if plan is not None and plan.source.get("sha256") not in (None, digest):
            raise CvqdError(f"checkpoint {ckpt} is not the one plan {plan.root} was exported from "
                            f"({plan.source.get('checkpoint')}); give matching files")
        from cvqd.runtime.backend_torch import torch_backend

        backend, cfg, null, _ = torch_backend(ckpt, device, clip_weights, precision)
        return Pipeline(backend, cfg, null, model_id=digest[:12], kernels=kernels, graphs=graphs, warn=warn)
    if precision not in (None, "auto", "fp32", "fp16"):
        raise CvqdError(f"precision {precision!r} is for the torch backend; plans are fp32 or fp16")
    if plan is None:
        if plan_for is None:
            raise CvqdError(f"the {name} backend runs a plan: give a plan directory (cvqd-export makes one)")
        plan = plan_for(Path(ckpt), precision if precision in ("fp32", "fp16") else "fp32")
    if precision in ("fp32", "fp16") and plan.precision != precision:
        raise CvqdError(f"plan {plan.root} is {plan.precision}, not {precision}; export a {precision} plan "
                        f"(cvqd-export --precision {precision})")
    if name == "onnxruntime":
        from cvqd.runtime.backend_ort import ort_backend

        backend = ort_backend(plan, device, warn=warn)
    else:
        from cvqd.runtime.backend_trt import trt_backend

        backend = trt_backend(plan, device)
    return Pipeline(backend, plan.config, plan.null_embedding, model_id=plan.model_id, kernels=kernels,
                    graphs=graphs, warn=warn)


AR_SETTINGS = ("temperature", "top_k", "top_p")


def resolve_settings(config: ModelConfig, steps: int | None = None, guidance: float | None = None,
                     truncation: float | None = None, temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None) -> dict[str, Any]:
    """The sampling settings of a request with the model's defaults filled in; CvqdError when out of range or not
    the model's kind: diffusion models take steps / guidance / truncation, autoregressive ones guidance /
    temperature / top_k / top_p."""
    s = config.sampling
    if config.generator == "ar":
        given = [n for n, v in (("steps", steps), ("truncation", truncation)) if v is not None]
        if given:
            what = "is a diffusion setting" if len(given) == 1 else "are diffusion settings"
            raise CvqdError(f"{' and '.join(given)} {what}; this is an autoregressive (CLIP-GEN) model, sampled with "
                            f"guidance, temperature, top_k and top_p")
        guidance = s.guidance if guidance is None else guidance
        temperature = s.temperature if temperature is None else temperature
        top_k = s.top_k if top_k is None else top_k
        top_p = s.top_p if top_p is None else top_p
        check_settings(None, guidance, None)
        check_ar_settings(temperature, top_k, top_p, config.ar.num_classes)
        return {"guidance": float(guidance), "temperature": float(temperature), "top_k": int(top_k),
                "top_p": float(top_p)}
    given = [n for n, v in zip(AR_SETTINGS, (temperature, top_k, top_p)) if v is not None]
    if given:
        raise CvqdError(f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} for autoregressive (CLIP-GEN) "
                        f"models; this is a diffusion model, sampled with steps, guidance and truncation")
    steps = s.steps if steps is None else steps
    guidance = s.guidance if guidance is None else guidance
    truncation = s.truncation if truncation is None else truncation
    check_settings(steps, guidance, truncation, config.diffusion.num_steps)
    return {"steps": steps, "guidance": float(guidance), "truncation": float(truncation)}


def check_settings(steps: int | None, guidance: float | None, truncation: float | None,
                   num_steps: int | None = None) -> None:
    """Range checks of the sampling settings (None = not given); steps against T when `num_steps` is known."""
    if steps is not None:
        top = num_steps or sys.maxsize
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= top:
            where = f"1..{num_steps} (this model's T)" if num_steps else ">= 1"
            raise CvqdError(f"steps must be an integer {where}, got {steps!r}")
    if guidance is not None and (not isinstance(guidance, (int, float)) or not math.isfinite(guidance)
                                 or not 0 <= guidance <= 50):
        raise CvqdError(f"guidance must be a number in [0, 50] (1 = no guidance), got {guidance!r}")
    if truncation is not None and (not isinstance(truncation, (int, float)) or not math.isfinite(truncation)
                                   or not 0 < truncation <= 1):
        raise CvqdError(f"truncation must be in (0, 1] (1 = keep every class), got {truncation!r}")


def check_ar_settings(temperature, top_k, top_p, num_classes: int | None = None) -> None:
    """Range checks of the autoregressive sampling settings (None = not given)."""
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not math.isfinite(temperature) or not 0 <= temperature <= 10):
        raise CvqdError(f"temperature must be a number in [0, 10] (0 = greedy, 1 = the model's distribution), got "
                        f"{temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0
                              or (num_classes is not None and top_k > num_classes)):
        top = f"0..{num_classes}" if num_classes else ">= 0"
        raise CvqdError(f"top_k must be an integer in {top} (0 = every class), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not math.isfinite(top_p) or not 0 < top_p <= 1):
        raise CvqdError(f"top_p must be in (0, 1] (1 = keep every class), got {top_p!r}")


def validate_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise CvqdError("no prompt given; pass at least one non-empty prompt")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise CvqdError(f"empty prompt {p!r}; every prompt must contain some text")
    return [p.strip() for p in prompts]



def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return True
    msg = str(exc).lower()
    return type(exc).__module__.startswith("onnxruntime") and ("failed to allocate" in msg or "out of memory" in msg)


def _free_cuda() -> None:
    torch = sys.modules.get("torch")  # only when something already loaded it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
