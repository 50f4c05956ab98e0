"""VQ-Diffusion training objective (docs/algorithm.md#training-losses) on top of the shared schedule.

Per sample, with x_t ~ q(x_t | x_0) at an importance-sampled t:
    L_t   = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))   for t > 0
    L_0   = -log p_theta(x_0 | x_1)                               for t = 0
    L_aux = KL(onehot(x_0) || p_theta(x_0 | x_t)) (the NLL at t = 0), weighted by aux_weight * (2 - t/T)
    loss  = mean_b (L_t + L_aux) / p(t), reported per token in bits (divided by N ln 2).
"""

from __future__ import annotations

import math

import torch

from cvqd.model.config import DiffusionConfig
from cvqd.model.schedule import LOG_ZERO, MaskReplaceSchedule


def log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Indices [B, N] -> log one-hot [B, C, N] (0 at the index, LOG_ZERO elsewhere)."""
    onehot = x.unsqueeze(1) == torch.arange(num_classes, device=x.device).view(1, -1, 1)
    return torch.where(onehot, 0.0, LOG_ZERO)


def multinomial_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over dim 1 of log-prob tensors [B, C, N] -> [B, N]."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def diffusion_loss_terms(log_x0_pred: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         schedule: MaskReplaceSchedule, cfg: DiffusionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (L_t or L_0, weighted auxiliary loss), each [B], in nats summed over positions.

    log_x0_pred [B, K, N] log p_theta(x_0 | x_t); x0, x_t [B, N]; t [B].
    """
    K = schedule.num_classes
    log_model = schedule.q_posterior(log_x0_pred, x_t, t)  # [B, K+1, N]
    log_true = schedule.q_posterior(log_onehot(x0, K), x_t, t)
    is_mask = (x_t == K).float()
    weight = is_mask * cfg.mask_weight[0] + (1 - is_mask) * cfg.mask_weight[1]  # [B, N]
    kl = (multinomial_kl(log_true, log_model) * weight).sum(1)
    nll = -(log_model.gather(1, x0.unsqueeze(1)).squeeze(1)).sum(1)  # -log p(x_{-1} = x_0 | x_t)
    is_t0 = (t == 0).float()
    vb = is_t0 * nll + (1 - is_t0) * kl
    aux = (-(log_x0_pred.gather(1, x0.unsqueeze(1)).squeeze(1)) * weight).sum(1)  # KL(onehot || p) = -log p
    aux = is_t0 * nll + (1 - is_t0) * aux
    aux_scale = (2.0 - t.float() / schedule.num_steps) if cfg.adaptive_aux else torch.ones_like(vb)
    return vb, cfg.aux_weight * aux_scale * aux


def diffusion_loss(log_x0_pred, x0, x_t, t, pt, schedule, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss (bits per token) and its parts; `vb` per sample feeds the importance sampler."""
    vb, aux = diffusion_loss_terms(log_x0_pred, x0, x_t, t, schedule, cfg)
    norm = x0.shape[1] * math.log(2)
    loss = ((vb + aux) / pt).mean() / norm
    return loss, {"vb": vb.detach(), "vb_bits": (vb.detach() / norm).mean(), "aux_bits": (aux.detach() / norm).mean()}


class ImportanceSampler:
    """t ~ p_t proportional to sqrt(EMA of L_t^2), uniform until every t was seen more than 10 times."""

    def __init__(self, num_steps: int, enabled: bool = True, device: torch.device | str = "cpu"):
        self.num_steps, self.enabled = num_steps, enabled
        self.history = torch.zeros(num_steps, dtype=torch.float64, device=device)  # EMA of L_t^2
        self.count = torch.zeros(num_steps, dtype=torch.long, device=device)

    def ready(self) -> bool:
        return self.enabled and bool((self.count > 10).all())

    def probs(self) -> torch.Tensor:
        if not self.ready():
            return torch.full((self.num_steps,), 1.0 / self.num_steps, dtype=torch.float64, device=self.history.device)
        w = torch.sqrt(self.history + 1e-10) + 1e-4
        w[0] = w[1]  # the t = 0 decoder term is on another scale; weight it like t = 1
        return w / w.sum()

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (t [batch] int64, p(t) [batch] float32)."""
        p = self.probs()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, p[t].float()

    @torch.no_grad()
    def update(self, t: torch.Tensor, vb: torch.Tensor) -> None:
        """Fold per-sample losses `vb` [B] at timesteps `t` [B] into the EMA (in batch order)."""
        t, sq = t.to(self.history.device), vb.detach().double().to(self.history.device) ** 2
        for ti, li in zip(t.tolist(), sq.tolist()):  # sequential like the reference's scatter
            self.history[ti] = 0.1 * li + 0.9 * self.history[ti]
            self.count[ti] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.history.copy_(state["history"])
        self.count.copy_(state["count"])
