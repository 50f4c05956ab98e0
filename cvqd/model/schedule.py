"""Mask-and-replace discrete diffusion schedule (VQ-Diffusion; docs/algorithm.md#schedule and #posterior).

Token states are 0..K-1 (real codebook entries) and K ([MASK], absorbing). Timesteps are 0-based,
t = 0..T-1. Per step a real token stays with probability alpha_t + beta_t, moves to each other real token
with beta_t and becomes [MASK] with gamma_t. The cumulative terms abar_t, bbar_t, gbar_t give
q(x_t | x_0); index -1 (stored at index T) is the identity, i.e. "x_{-1}" is x_0 itself.

Everything here works on log-probabilities clamped to [LOG_ZERO, 0] and never builds K x K matrices.
The same object serves training (losses, forward noising) and inference (the reverse step), so the
runtime owns it and training imports it.

Shapes: log_x0 [B, K, N] (log p(x_0) over the K real classes), x_t [B, N] int64, t and s ints or
int64 [B]; posteriors are [B, K+1, N] with the mask class last.

The tables are computed in float64 with numpy and stored as float32 numpy arrays; the torch tensors that training
and the GPU path use are made from them on first use (so the CPU runtime never imports torch, and every path sees
the same float32 constants). `posterior_from_terms` is written once for numpy arrays and torch tensors
(cvqd/model/arrays.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvqd.model.arrays import xp

LOG_ZERO = -70.0  # log-probability floor of the whole pipeline (the reference clamps to [-70, 0])


def _log(x: np.ndarray) -> np.ndarray:
    """log with log(0) = -inf (exact zeros: the identity at s = -1, impossible transitions)."""
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(x, 0.0))


class MaskReplaceSchedule:
    """Cumulative and per-step mask-and-replace terms, forward noising and exact posteriors.

    `q_posterior(log_x0, x_t, t, s)` gives p(x_s | x_t) = sum_x0 q(x_s | x_t, x_0) p(x_0) for any
    -1 <= s < t (s defaults to t - 1); strided sampling uses the exact multi-step terms, built in float64.
    """

    def __init__(self, num_classes: int, num_steps: int = 100, att_1: float = 0.99999, att_T: float = 9e-6,
                 ctt_1: float = 9e-6, ctt_T: float = 0.99999, device: torch.device | str | None = None):
        if num_classes < 2 or num_steps < 2:
            raise ValueError(f"need num_classes >= 2 and num_steps >= 2, got {num_classes}, {num_steps}")
        K, T = num_classes, num_steps
        self.num_classes, self.num_steps = K, T
        self.params = dict(att_1=att_1, att_T=att_T, ctt_1=ctt_1, ctt_T=ctt_T)
        frac = np.arange(T, dtype=np.float64) / (T - 1)
        abar = att_1 + frac * (att_T - att_1)  # [T]
        gbar = ctt_1 + frac * (ctt_T - ctt_1)
        # float64 numpy views, index T = identity (abar = 1, bbar = 0, gbar = 0)
        self.abar = np.concatenate([abar, [1.0]])
        self.gbar = np.concatenate([gbar, [0.0]])
        self.bbar = (1.0 - self.abar - self.gbar) / K
        # per-step terms: step t goes from t-1 (the identity for t = 0) to t
        self.alpha, self.gamma, self.beta = self._between(np.arange(-1, T - 1), np.arange(T))

        # multi-step transition q(x_t | x_s) for every pair, table index [s + 1, t]
        s_idx, t_idx = np.meshgrid(np.arange(-1, T - 1), np.arange(T), indexing="ij")
        with np.errstate(divide="ignore", invalid="ignore"):
            a_st, g_st, b_st = self._between(s_idx, t_idx)
        valid = s_idx < t_idx
        a_st, g_st, b_st = (np.where(valid, v, 0.0) for v in (a_st, g_st, b_st))

        f32 = lambda x: x.astype(np.float32)  # noqa: E731  (round to nearest, as torch.tensor(..., float32))
        self.tables = {
            # cumulative, [T + 1]
            "log_abar": f32(_log(self.abar)), "log_bbar": f32(_log(self.bbar)), "log_gbar": f32(_log(self.gbar)),
            "log_abar_bbar": f32(_log(self.abar + self.bbar)),
            # s -> t transitions, [T, T] indexed [s + 1, t]
            "log_a_st": f32(_log(a_st)), "log_b_st": f32(_log(b_st)), "log_g_st": f32(_log(g_st)),
            "log_ab_st": f32(_log(a_st + b_st)),
            # float64 probabilities for forward noising, [T + 1]
            "abar64": self.abar, "bbar64": self.bbar, "gbar64": self.gbar,
        }
        self._device = None if device is None else str(device)
        self._torch: dict[str, Any] | None = None

    @property
    def _t(self) -> dict[str, Any]:
        """The tables as torch tensors on the schedule's device (made on first use)."""
        if self._torch is None:
            import torch

            self._torch = {k: torch.from_numpy(v.copy()).to(self._device or "cpu") for k, v in self.tables.items()}
        return self._torch

    @classmethod
    def from_config(cls, cfg, num_classes: int, device=None) -> "MaskReplaceSchedule":
        """From a `cvqd.model.config.DiffusionConfig` (or anything with the same attributes)."""
        return cls(num_classes, cfg.num_steps, cfg.att_1, cfg.att_T, cfg.ctt_1, cfg.ctt_T, device=device)

    def _between(self, s, t):
        """alpha, gamma, beta of q(x_t | x_s) in float64 (s = -1 is the identity, stored at index T)."""
        s = np.asarray(s) % (self.num_steps + 1)
        a = self.abar[t] / self.abar[s]
        keep = (1.0 - self.gbar[t]) / (1.0 - self.gbar[s])  # P(not masked between s and t)
        # beta from the difference of the two ratios, not 1 - a - g, to avoid cancellation near 1
        return a, 1.0 - keep, (keep - a) / self.num_classes

    @property
    def device(self):
        """The torch device of the tensor tables (imports torch)."""
        import torch

        return torch.device(self._device or "cpu")

    def to(self, device) -> "MaskReplaceSchedule":
        """A copy whose tensors live on `device` (the numpy tables are shared)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._device, other._torch = str(device), None
        return other

    # ------------------------------------------------------------------------------------- helpers

    def _at(self, name: str, idx, ndim: int = 3):
        """Table entry for an int index (0-d tensor) or an int64 [B] index (viewed [B, 1, ...])."""
        v = self._t[name][idx]
        return v.view(-1, *([1] * (ndim - 1))) if v.dim() == 1 else v

    def _pair(self, name: str, t, s, ndim: int = 3):
        v = self._t[name][s + 1, t]
        return v.view(-1, *([1] * (ndim - 1))) if v.dim() == 1 else v

    def _cum(self, idx):
        """Map timestep -1 (the identity) to its storage index T."""
        return idx % (self.num_steps + 1)

    def strided_steps(self, steps: int) -> list[tuple[int, int]]:
        """(t, s) pairs for a reverse pass of `steps` evaluations from t = T-1 down to x_0 (s = -1).

        `steps` = T gives the usual one-step chain; fewer steps spread the t's evenly and each (t, s)
        transition uses the exact multi-step posterior q(x_s | x_t, x_0).
        """
        T = self.num_steps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        ts = [T - 1] if steps == 1 else [round((T - 1) * (steps - 1 - i) / (steps - 1)) for i in range(steps)]
        assert len(set(ts)) == len(ts) and ts[-1] == (0 if steps > 1 else T - 1)
        return list(zip(ts, ts[1:] + [-1]))

    # ------------------------------------------------------------------------------ forward process

    def log_q_xt_given_x0(self, x0, t):
        """log q(x_t | x_0) for real tokens x0 [B, N] (tensors): [B, K+1, N] (abar onehot + bbar; gbar on [MASK])."""
        import torch

        K = self.num_classes
        onehot = x0.unsqueeze(1) == torch.arange(K, device=x0.device).view(1, K, 1)  # [B, K, N]
        real = torch.where(onehot, self._at("log_abar_bbar", t), self._at("log_bbar", t))
        mask = self._at("log_gbar", t).expand(x0.shape[0], 1, x0.shape[1])
        return torch.cat([real, mask], dim=1).clamp(LOG_ZERO, 0)

    def q_sample(self, x0, t, generator=None):
        """Draw x_t ~ q(x_t | x_0) for real tokens x0 [B, N] (int64) at timesteps t (int or [B]).

        One uniform per position: below gbar_t -> [MASK]; below gbar_t + K bbar_t -> a uniformly random
        real token (which may equal x_0); otherwise x_0. This is the exact forward marginal.
        """
        import torch

        K = self.num_classes
        # the tables may live on the GPU while training draws its noise on the CPU generator (same on any device)
        g = self._at("gbar64", t, ndim=2).to(x0.device)
        kb = K * self._at("bbar64", t, ndim=2).to(x0.device)
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        rand_tok = torch.randint(0, K, x0.shape, generator=generator, device=x0.device)
        xt = torch.where(u < g + kb, rand_tok, x0)
        return torch.where(u < g, torch.full_like(x0, K), xt)

    # ------------------------------------------------------------------------------ reverse process

    def q_sample_host(self, x0: np.ndarray, t: int, u: np.ndarray) -> np.ndarray:
        """x_t ~ q(x_t | x_0) for tokens x0 [B, N] at one timestep t, from given uniforms u [B, 2, N] (the
        deterministic noise of a global edit): u0 < gbar_t -> [MASK]; u0 < gbar_t + K bbar_t -> token floor(u1 K);
        otherwise x0 (the exact forward marginal, as `q_sample`)."""
        K = self.num_classes
        g, kb = self.gbar[t], K * self.bbar[t]
        rand_tok = np.minimum((u[:, 1] * K).astype(np.int64), K - 1)
        xt = np.where(u[:, 0] < g + kb, rand_tok, x0)
        return np.where(u[:, 0] < g, K, xt).astype(np.int64)

    def host_terms(self, t: int, s: int) -> dict[str, np.float32]:
        """`posterior_terms` for one int transition t -> s, as numpy float32 scalars (the step table's row)."""
        if not -1 <= s < t < self.num_steps:
            raise ValueError(f"need -1 <= s < t < {self.num_steps}, got t={t}, s={s}")
        tb, cs = self.tables, self._cum(s)
        return {"lq_same": tb["log_abar_bbar"][t], "lq_other": tb["log_bbar"][t], "lq_mask": tb["log_gbar"][t],
                "ls_a": tb["log_abar"][cs], "ls_b": tb["log_bbar"][cs], "ls_g": tb["log_gbar"][cs],
                "tr_same": tb["log_ab_st"][s + 1, t], "tr_other": tb["log_b_st"][s + 1, t],
                "tr_mask": tb["log_g_st"][s + 1, t]}

    def posterior_terms(self, t, s=None) -> dict[str, Any]:
        """The nine log-constants the posterior needs for the transition t -> s (s defaults to t - 1).

        lq_*: q(x_t | x_0) (x_t real and equal to x_0 / real and different / masked);
        ls_*: q(x_s | x_0) cumulative terms at s; tr_*: q(x_t | x_s) (same three cases).
        The fused CUDA kernel reads exactly these values from a per-step table.
        """
        if s is None:
            s = t - 1
        if isinstance(t, int) and isinstance(s, int) and not -1 <= s < t < self.num_steps:
            raise ValueError(f"need -1 <= s < t < {self.num_steps}, got t={t}, s={s}")
        cs = self._cum(s)
        return {
            "lq_same": self._at("log_abar_bbar", t), "lq_other": self._at("log_bbar", t),
            "lq_mask": self._at("log_gbar", t),
            "ls_a": self._at("log_abar", cs), "ls_b": self._at("log_bbar", cs), "ls_g": self._at("log_gbar", cs),
            "tr_same": self._pair("log_ab_st", t, s), "tr_other": self._pair("log_b_st", t, s),
            "tr_mask": self._pair("log_g_st", t, s),
        }

    def q_posterior(self, log_x0, x_t, t, s=None):
        """log p(x_s | x_t) = log sum_x0 q(x_s | x_t, x_0) p(x_0); [B, K+1, N], clamped to [-70, 0].

        log_x0: [B, K, N] log p(x_0) over real classes (normalised); x_t: [B, N] int64 (mask id = K).
        With s = t - 1 (default) this is the one-step posterior of VQ-Diffusion; any -1 <= s < t uses the
        exact multi-step transition q(x_t | x_s); s = -1 returns the distribution of x_0 itself.
        """
        return posterior_from_terms(log_x0, x_t, self.posterior_terms(t, s))


def posterior_from_terms(log_x0, x_t, c: dict[str, Any]):
    """The posterior of `MaskReplaceSchedule.q_posterior` given its `posterior_terms` (reference math; numpy
    arrays or torch tensors, differentiable with torch).

    p(x_s = j | x_t) = Z * m_j * tr_j with, for real x_t = k:
      w_i = p(x0=i) / q(x_t=k | x0=i), Z = sum_i w_i, m_j = abar_s w_j/Z + bbar_s (real j), gbar_s ([MASK]),
      tr_j = q(x_t=k | x_s=j): a + b if j = k, b for other real j, 0 for [MASK];
    and for masked x_t: w = p / gbar_t, tr_j = g for real j and 1 for [MASK].
    """
    ops = xp(log_x0)
    B, K, N = log_x0.shape
    is_mask = (x_t == K)[:, None, :]  # [B, 1, N]
    onehot = x_t[:, None, :] == ops.arange_like(K, x_t).reshape(1, K, 1)  # [B, K, N]
    log_qt = ops.where(is_mask, c["lq_mask"], ops.where(onehot, c["lq_same"], c["lq_other"]))
    q = log_x0 - log_qt
    z = ops.logsumexp(q, 1)  # [B, 1, N]
    q = q - z
    m_real = ops.logaddexp(c["ls_a"] + q, c["ls_b"])  # [B, K, N]
    tr_real = ops.where(is_mask, c["tr_mask"], ops.where(onehot, c["tr_same"], c["tr_other"]))
    out_real = m_real + tr_real + z
    # real x_t never came from [MASK]
    out_mask = c["ls_g"] + ops.where(is_mask, ops.scalar(0.0, z), ops.scalar(float("-inf"), z)) + z  # [B, 1, N]
    return ops.clip(ops.concat([out_real, ops.expand(out_mask, (B, 1, N))], 1), LOG_ZERO, 0.0)
