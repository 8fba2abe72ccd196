"""Per-sample training losses: EDM teacher pre-training, ECT and SCT consistency tuning.

References
----------
* Karras et al. 2022 (EDM), Eq. 2 with the weight lambda(sigma) of Table 1: denoising score matching.
* Geng et al. 2024 (ECT), Sec. 3 and the official code (``ect-edm-code-facts.md`` Sec. 1.1-1.4):
  log-normal t, r = mapping(t, stage), one shared eps, the same network as a stop-gradient target with
  the same dropout mask, pseudo-Huber / L2 distance and a 1/(t - r) or "snrpk" weight.
* Wang et al. 2024 (SCT), Sec. 4.1 [RECON]: the target point is the variance-reduced x_hat_r built from
  the score-identity estimate of E[x0 | x_t] over a reference set; Sec. 4.2 [RECON]: smooth schedule;
  Sec. 4.3 / PCM [RECON]: phased consistency functions f^m(x, t) = (s_m/t) x + (1 - s_m/t) D(x, t).

Protocol: ``loss(net, x0, labels=None, *, nimg) -> (per_sample_loss [B], stats)``; ``net`` is a denoiser
D(x, sigma, labels), possibly DDP-wrapped. t, eps and dropout masks come from the global torch RNG.
Nothing here synchronises with the host (no ``.item()``), so the losses are graph-capture friendly.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from sctlib.config import LossConfig
from sctlib.networks.layers import record_dropout, replay_dropout
from sctlib.progress import phase as _phase
from sctlib.precond import as_sigma
from sctlib.references import ReferenceSource, build_references
from sctlib.schedules import (MAPPINGS, SCHEDULES, SMOOTH_ENDS, WEIGHTINGS, loss_weight, mapping_r,
                              sample_t_lognormal, stage_exponent)
from sctlib.targets import REF_SOURCES, ect_target_point, sct_target_point

__all__ = ["EDMLoss", "ECTLoss", "SCTLoss", "build_loss", "TASKS", "noise_like"]

TASKS = ("edm", "ect", "sct")

Stats = Dict[str, torch.Tensor]


def noise_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn in the logical (NCHW) element order, then laid out as x; from
    ``generator`` when given (the samplers' re-noising), else from the global stream (training).

    ``torch.randn_like`` fills a channels-last tensor in its memory order, so the same seed would give other
    noise per pixel under ``channels_last=true``: the training run would depend on the memory format, and
    resuming or comparing runs across formats would not continue the same draws (found by
    benchmarks/compile_check.py: compiled + channels-last had gradient cosine 0.974 against eager NCHW).
    """
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        eps = eps.contiguous(memory_format=torch.channels_last)
    return eps


def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares over all non-batch dimensions -> [B]."""
    return x.pow(2).reshape(x.shape[0], -1).sum(dim=1)


def _mean_sq(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).reshape(x.shape[0], -1).mean(dim=1)


def _check_common(cfg: LossConfig) -> None:
    if cfg.weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {cfg.weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if cfg.P_std < 0:
        raise ValueError(f"P_std must be >= 0, got {cfg.P_std}")
    if not cfg.sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {cfg.sigma_data}")


class EDMLoss:
    """EDM Eq. 2: lambda(t) * sum_pixels (D(x0 + t eps, t) - x0)^2 with log-normal t (teacher pre-training).

    ``cfg.weighting`` picks lambda ('edm' = (t^2 + sd^2)/(t sd)^2 by default; 'inv_dt' becomes 1/t since r = 0).
    """

    def __init__(self, cfg: LossConfig):
        _check_common(cfg)
        self.cfg = cfg

    def stage(self, nimg: float) -> float:
        return 0.0  # diffusion training: r = 0 throughout

    def ratio(self, nimg: float) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"EDMLoss has no state, got keys {sorted(state)}")

    def __call__(self, net: nn.Module, x0: torch.Tensor, labels=None, *, nimg: float,
                 target_net: Optional[nn.Module] = None, step_batch=None) -> Tuple[torch.Tensor, Stats]:
        """Per-example loss of ``net`` on ``x0``; ``target_net`` is accepted for a common call and unused (denoising
        score matching has no target pass); ``step_batch`` (SCT's 'all' references) is refused: it has no references."""
        if step_batch is not None:
            raise ValueError("step_batch is the reference set of SCT's 'all' source; the EDM loss has no references")
        cfg = self.cfg
        t = sample_t_lognormal(x0.shape[0], cfg.P_mean, cfg.P_std, device=x0.device)
        eps = noise_like(x0)
        x_t = x0 + as_sigma(t, x0) * eps
        D_t = net(x_t, t, labels)
        r = torch.zeros_like(t)
        loss = loss_weight(t, r, cfg.weighting, cfg.sigma_data) * _sum_sq(D_t - x0)
        stats = {
            "t": t.detach(),
            "r": r,
            "residual": _mean_sq(D_t.detach() - x0),
            "nonfinite": (~torch.isfinite(loss.detach())).sum(),
        }
        return loss, stats


class ECTLoss:
    """Easy Consistency Tuning loss (ECT Sec. 3; code facts Sec. 1.2), with optional phases (PCM / SCT 4.3).

    Per sample: t log-normal; a = stage_exponent(nimg); r = max(mapping_r(t, a), s_m(t)); one eps;
    student f^m(x_t, t) with grad; target sg(f^m(x_r, r)) from the same network with the same dropout
    masks (record/replay, no RNG rewinding); where r == s_m the target is the target point itself (the
    clean x0 for one phase). Distance sqrt(L2 + c^2) - c (c > 0) or sqrt(L2); times loss_weight(t, r).
    """

    def __init__(self, cfg: LossConfig):
        _check_common(cfg)
        if cfg.mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {cfg.mapping!r}; valid: {', '.join(MAPPINGS)}")
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if cfg.smooth_end not in SMOOTH_ENDS:
            raise ValueError(f"unknown loss.smooth_end {cfg.smooth_end!r}; valid: {', '.join(SMOOTH_ENDS)}")
        if not cfg.double_nimg > 0:
            raise ValueError(f"double_nimg must be > 0, got {cfg.double_nimg}")
        if not cfg.q > 1:
            raise ValueError(f"q must be > 1, got {cfg.q}")
        if cfg.c < 0:
            raise ValueError(f"pseudo-Huber c must be >= 0, got {cfg.c}")
        edges = [float(e) for e in cfg.edges]
        if not edges or edges[0] != 0.0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(
                f"loss edges must be strictly increasing and start at s_0 = 0, got {list(cfg.edges)}; "
                "the sigma_min boundary is the job of Precond(boundary=...)")
        self.cfg = cfg
        self.edges = edges

    # -- schedule, for logs ---------------------------------------------------------------------
    def stage(self, nimg: float) -> float:
        """The exponent a of Delta t / t = q^{-a} n(t) (ECT staircase or SCT smooth)."""
        return stage_exponent(nimg, self.cfg.double_nimg, self.cfg.schedule, self.cfg.smooth_end)

    def ratio(self, nimg: float) -> float:
        """r / t for large t ('const' mapping): 1 - q^{-a} (ECT's logged 'ratio')."""
        return 1.0 - self.cfg.q ** (-self.stage(nimg))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    # -- pieces ---------------------------------------------------------------------------------
    def _lower_edge(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """s_m(t), the lower edge of t's phase; None for a single phase (s_0 = 0, f = D)."""
        if len(self.edges) == 1:
            return None
        # Python-scalar where's instead of a tensor of edges: no host-to-device copy per step.
        s = torch.zeros_like(t)
        for e in self.edges[1:]:
            s = torch.where(t >= e, e, s)
        return s

    @staticmethod
    def _phased(x: torch.Tensor, t: torch.Tensor, s: Optional[torch.Tensor], D_out: torch.Tensor) -> torch.Tensor:
        """f^m = (s_m/t) x + (1 - s_m/t) D (PCM Eq. 3, VE form); exactly D for one phase."""
        if s is None:
            return D_out
        ratio = as_sigma(s / t, x)
        return ratio * x + (1 - ratio) * D_out

    def _target_point(self, x_t, t, r, x0, eps, labels, stats: Stats, step_batch=None) -> torch.Tensor:
        if step_batch is not None:  # no references in ECT: a step batch here is a caller's mistake
            raise ValueError("step_batch is the reference set of SCT's 'all' source; ECT has no references")
        return ect_target_point(x0, eps, r)

    # -- the loss -------------------------------------------------------------------------------
    def __call__(self, net: nn.Module, x0: torch.Tensor, labels=None, *, nimg: float,
                 target_net: Optional[nn.Module] = None, step_batch=None) -> Tuple[torch.Tensor, Stats]:
        """Per-example loss (ECT Sec. 3). ``net`` runs the student pass with gradients;
        ``target_net`` (the same weights; default: ``net`` with a DistributedDataParallel wrapper taken off) runs
        the stop-gradient target pass. The trainer passes its own: under DDP the bare network, compiled when the
        student is (:func:`sctlib.train.wrap_network`). ``step_batch`` (:class:`sctlib.references.StepBatch`), the
        step's whole global batch: the reference set of SCT's ``'all'`` source (refused by ECT and the other
        sources)."""
        cfg = self.cfg
        B = x0.shape[0]
        t = sample_t_lognormal(B, cfg.P_mean, cfg.P_std, device=x0.device)
        eps = noise_like(x0)
        a = self.stage(nimg)
        r = mapping_r(t, a, q=cfg.q, k=cfg.k, b=cfg.b, mapping=cfg.mapping)
        s = self._lower_edge(t)
        if s is not None:
            r = torch.maximum(r, s)  # both points stay in t's phase (PCM Eq. 5)
        at_edge = r <= (torch.zeros_like(r) if s is None else s)  # r == s_m: target = target point

        x_t = x0 + as_sigma(t, x0) * eps
        stats: Stats = {}
        with _phase("target_point"):
            x_r = self._target_point(x_t, t, r, x0, eps, labels, stats, step_batch)

        # Student with grad; its dropout masks are recorded for the target pass.
        with record_dropout(net), _phase("student"):
            f_t = self._phased(x_t, t, s, net(x_t, t, labels))

        # Target: same weights, no grad, same dropout masks (replayed, so the global RNG is untouched).
        # Rows with r == s_m get a safe sigma (t) and are then replaced by x_r: no log(0), no host sync.
        # The target pass needs no gradient communication, so it does not go through DDP.
        if target_net is None:
            target_net = getattr(net, "module", net)
        r_safe = torch.where(at_edge, t, r)
        with torch.no_grad(), replay_dropout(target_net), _phase("target"):
            f_r = self._phased(x_r, r_safe, s, target_net(x_r, r_safe, labels))
        target = torch.where(at_edge.reshape(B, *([1] * (x0.ndim - 1))), x_r, f_r).detach()

        diff = f_t - target
        L2 = _sum_sq(diff)
        dist = (L2 + cfg.c**2).sqrt() - cfg.c if cfg.c > 0 else L2.sqrt()
        loss = dist * loss_weight(t, r, cfg.weighting, cfg.sigma_data)
        stats.update({
            "t": t.detach(),
            "r": r.detach(),
            "residual": _mean_sq(diff.detach()),
            "nonfinite": (~torch.isfinite(loss.detach())).sum(),
        })
        return loss, stats


class SCTLoss(ECTLoss):
    """Stable Consistency Tuning loss (SCT Sec. 4.1 [RECON]): ECT with the variance-reduced target point.

    x0_hat = the posterior-mean estimate of a :class:`~sctlib.references.ReferenceSource` (class-restricted
    if ``cfg.ref_conditional`` and labels are given; the own x0 is always one of the references), then
    x_hat_r = sct_target_point(...). With a reference set holding only the own x0 this reproduces ECT bit
    for bit. ``references`` defaults to the source ``cfg.ref_source`` names ('dataset' must be passed in:
    it needs the training set). Stats add 'fallback' (rows without any reference), 'ess' [B],
    'own_weight' [B] and 'n_refs' [B].
    """

    def __init__(self, cfg: LossConfig, references: Optional[ReferenceSource] = None):
        super().__init__(cfg)
        if cfg.ref_source not in REF_SOURCES:
            raise ValueError(f"unknown ref_source {cfg.ref_source!r}; valid: {', '.join(REF_SOURCES)}")
        if cfg.ref_chunk < 1:
            raise ValueError(f"ref_chunk must be >= 1, got {cfg.ref_chunk}")
        if references is None and cfg.ref_source != "dataset":
            references = build_references(cfg)
        self.references = references

    @property
    def bank(self):
        return getattr(self.references, "bank", None)

    def state_dict(self) -> dict:
        return {} if self.references is None else self.references.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.references is None:
            super().load_state_dict(state)
        else:
            self.references.load_state_dict(state)

    def _target_point(self, x_t, t, r, x0, eps, labels, stats: Stats, step_batch=None) -> torch.Tensor:
        cfg = self.cfg
        if self.references is None:
            raise ValueError("loss.ref_source='dataset' needs the training set: build the loss with "
                             "build_loss(cfg, references=build_references(cfg, dataset=...)) (the trainer does)")
        use_labels = labels if (cfg.ref_conditional and labels is not None) else None
        x0_hat, pm = self.references(x_t, t, x0, use_labels, chunk_size=cfg.ref_chunk, step_batch=step_batch)
        for k in ("fallback", "ess", "own_weight", "n_refs"):
            stats[k] = pm[k]
        return sct_target_point(x_t, t, r, x0, eps, x0_hat)


def build_loss(cfg: LossConfig, references: Optional[ReferenceSource] = None):
    """The loss object for ``cfg.task``: 'edm' -> EDMLoss, 'ect' -> ECTLoss, 'sct' -> SCTLoss (``references``
    replaces the reference source the config names; only SCT uses it)."""
    classes = {"edm": EDMLoss, "ect": ECTLoss, "sct": SCTLoss}
    if cfg.task not in classes:
        raise ValueError(f"unknown loss task {cfg.task!r}; valid: {', '.join(TASKS)}")
    if cfg.task == "sct":
        return SCTLoss(cfg, references)
    return classes[cfg.task](cfg)
