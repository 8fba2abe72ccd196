"""Training-target points of consistency tuning: ECT's single-sample point and SCT's variance-reduced one.

References
----------
* Geng et al. 2024 (ECT, Sec. 3; code facts Sec. 1.1): one shared eps, x_t = x0 + t eps and the target
  point x_r = x0 + r eps.
* Xu et al. 2023 (STF, "Stable Target Field"): the self-normalised estimate of E[x0 | x_t] over a
  reference batch that contains the sample's own x0.
* Wang et al. 2024 (SCT, Sec. 4.1, Eq. 13 / Eq. 14 for the class-conditional case) [RECON]: the
  score-identity estimate eps_hat = (x_t - x0_hat) / t and the target point
  x_hat_r = x_t - (t - r) eps_hat = (r/t) x_t + (1 - r/t) x0_hat. With a reference set holding only the
  own x0 this is exactly ECT's point ("CT is a special case of SCT with only one reference sample").

The book's page *The paper* lists what is verified and what is reconstructed (SCT, arXiv 2410.18958,
Sec. 4.1, Eq. 13-14; the estimator of Xu, Tong, Jaakkola, "Stable Target Field", ICLR 2023, as in
github.com/Newbeeer/stf ``training/loss.py``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


__all__ = [
    "REF_SOURCES",
    "ect_target_point",
    "posterior_mean",
    "own_weight",
    "sct_target_point",
    "ReferenceBank",
    "gather_references",
]

REF_SOURCES = ("batch", "all", "bank", "dataset")


def _per_row(v, x: torch.Tensor) -> torch.Tensor:
    """A number, [B] or [B, 1, ...] tensor as [B, 1, ..., 1] in x's float precision (float64 stays float64).

    Unlike ``precond.as_sigma`` (float32 by design) this keeps float64 inputs exact for the reference tests.
    """
    v = torch.as_tensor(v, device=x.device)
    dtype = torch.promote_types(v.dtype, x.dtype) if v.is_floating_point() else x.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    v = v.to(dtype)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    if v.shape[0] not in (1, x.shape[0]) or v[0].numel() != 1:
        raise ValueError(f"expected a number or one value per sample ({x.shape[0]}), got shape {tuple(v.shape)}")
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1))).expand(x.shape[0], *([1] * (x.ndim - 1)))


def ect_target_point(x0: torch.Tensor, eps: torch.Tensor, r) -> torch.Tensor:
    """ECT's target point x_r = x0 + r eps, with the same eps as x_t = x0 + t eps (ECT Sec. 3)."""
    return x0 + _per_row(r, x0) * eps


def _class_index(labels: torch.Tensor) -> torch.Tensor:
    """Integer class indices from [B] indices or [B, C] one-hot rows."""
    labels = torch.as_tensor(labels)
    if labels.ndim == 2:
        return labels.argmax(dim=1)
    if labels.ndim != 1:
        raise ValueError(f"labels must be class indices [B] or one-hot rows [B, C], got shape {tuple(labels.shape)}")
    return labels.long()


@torch.no_grad()
def posterior_mean(
    x_t: torch.Tensor,
    t,
    ref: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    fallback: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    return_stats: bool = False,
    logit_dtype: torch.dtype = torch.float64,
    own: Optional[torch.Tensor] = None,
):
    """Self-normalised estimate of E[x0 | x_t] over a reference set (STF; SCT Sec. 4.1 Eq. 13/14 [RECON]).

    w_i = softmax_i(-||x_t - ref_i||^2 / (2 t^2)),  x0_hat = sum_i w_i ref_i  (shape of ``x_t``).

    The softmax is streamed over chunks of ``chunk_size`` references with an online log-sum-exp, so the
    memory is O(B x chunk + B x d) and B x n x d is never formed. The distance uses the matmul form
    ||x - r||^2 = ||x||^2 - 2 x.r + ||r||^2 whose ||x||^2 term is constant per row and drops out of the
    softmax. Computed in float32 (or float64 if the inputs are), stable for t in [1e-3, 1e3].

    With ``labels`` (Eq. 14-like), only references of the same class count. A sample with no
    same-class reference gets ``fallback[i]`` (the caller's own x0, i.e. the single-sample CT target);
    without ``fallback`` that case raises ValueError.

    The dot products x.r and the softmax run in ``logit_dtype`` (float64 by default) with autocast off:
    the logits are differences of numbers of size ||x|| ||r|| (~3e3 at ImageNet-64) divided by 2 t^2, so
    bf16 autocast or TF32 (relative error ~1e-3) would shift them by whole nats at t ~ 1 and scramble the
    weights. A float64 GEMM of B x n x d = 128 x 4096 x 12288 is ~13 GFLOP (well under a millisecond on
    Hopper's FP64 tensor cores). The weighted sum of the references runs in the input precision.

    ``return_stats=True`` returns ``(x0_hat, {'fallback': int64 count, 'ess': [B], 'n_refs': [B]})``,
    where ess = 1 / sum_i w_i^2 is the effective number of references (1 for fallback rows: their
    target is the single-sample one) and n_refs the number of references each row may use (same class).
    With ``own`` (each row's own clean image, which must be one of the references, as in training) the
    stats add 'own_weight' [B], the softmax weight of the own image (1 for fallback rows). No gradients
    flow.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B = x_t.shape[0]
    if ref.ndim < 1 or ref.shape[1:] != x_t.shape[1:]:
        raise ValueError(f"ref must have shape [n, {', '.join(map(str, x_t.shape[1:]))}], got {tuple(ref.shape)}")
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    x = x_t.detach().reshape(B, -1).to(dtype)
    R = ref.detach().reshape(ref.shape[0], -1).to(device=x.device, dtype=dtype)
    n = R.shape[0]
    # 1 / t^2 per row; t is floored so that 1/t^2 stays finite even for a denormal t.
    t = _per_row(t, x).reshape(B).to(dtype).clamp(min=1e-12)
    inv_t2 = 1.0 / (t * t)

    cond = labels is not None
    if cond:
        if ref_labels is None:
            raise ValueError("posterior_mean: labels were given but ref_labels is None")
        c = _class_index(labels).to(x.device)
        rc = _class_index(ref_labels).to(x.device)
        if c.shape[0] != B or rc.shape[0] != n:
            raise ValueError(f"labels must have {B} rows and ref_labels {n}, got {c.shape[0]} and {rc.shape[0]}")

    ldt = torch.promote_types(logit_dtype, dtype)
    xl, inv_t2 = x.to(ldt), inv_t2.to(ldt)
    m = torch.full((B,), float("-inf"), dtype=ldt, device=x.device)  # running max of the logits
    s1 = torch.zeros(B, dtype=ldt, device=x.device)  # sum exp(l - m)
    s2 = torch.zeros(B, dtype=ldt, device=x.device)  # sum exp(2 (l - m)), for the ESS
    acc = torch.zeros_like(x)                      # sum exp(l - m) ref
    n_refs = torch.full((B,), float(n), dtype=ldt, device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if cond:
            n_refs = (c[:, None] == rc[None, :]).sum(dim=1).to(ldt)
        for start in range(0, n, chunk_size):
            Rc = R[start:start + chunk_size]
            Rl = Rc.to(ldt)
            # -||x - r||^2 / (2 t^2) + const(row)  =  (x.r - ||r||^2 / 2) / t^2
            logits = (xl @ Rl.T - 0.5 * (Rl * Rl).sum(dim=1)) * inv_t2[:, None]
            if cond:
                logits = logits.masked_fill(c[:, None] != rc[None, start:start + chunk_size], float("-inf"))
            m_new = torch.maximum(m, logits.max(dim=1).values)
            # Rows that have seen no valid reference yet keep m = -inf; shift by 0 there to avoid inf - inf.
            shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            scale = (m - shift).exp()                  # 0 when m = -inf, exact 1 when the max is unchanged
            p = (logits - shift[:, None]).exp()        # masked entries -> exactly 0
            s1 = s1 * scale + p.sum(dim=1)
            s2 = s2 * scale * scale + (p * p).sum(dim=1)
            acc = acc * scale[:, None].to(dtype) + p.to(dtype) @ Rc
            m = m_new

    empty = s1 == 0  # no (same-class) reference at all
    x0_hat = acc / torch.where(empty, torch.ones_like(s1), s1)[:, None].to(dtype)
    n_fallback = empty.sum()
    if fallback is not None:
        if fallback.shape != x_t.shape:
            raise ValueError(f"fallback must have the shape of x_t {tuple(x_t.shape)}, got {tuple(fallback.shape)}")
        x0_hat = torch.where(empty[:, None], fallback.detach().reshape(B, -1).to(dtype), x0_hat)
    elif bool(empty.any()):  # host sync only without a fallback; the losses always pass one
        raise ValueError(
            f"posterior_mean: {int(n_fallback)} sample(s) have no reference (with the same label); "
            "pass fallback= (e.g. their own x0), or a reference set that covers every class")
    ess = torch.where(empty, torch.ones_like(s1), s1 * s1 / torch.where(empty, torch.ones_like(s2), s2))
    x0_hat = x0_hat.reshape(x_t.shape).to(x_t.dtype if x_t.is_floating_point() else dtype)
    if return_stats:
        stats = {"fallback": n_fallback.to(torch.int64), "ess": ess, "n_refs": n_refs}
        if own is not None:
            stats["own_weight"] = own_weight(xl, inv_t2, own, m, s1)
        return x0_hat, stats
    return x0_hat


def own_weight(xl: torch.Tensor, inv_t2: torch.Tensor, own: torch.Tensor, m: torch.Tensor,
               s1: torch.Tensor) -> torch.Tensor:
    """Softmax weight of each row's own image from the streamed (max m, sum s1) of a log-sum-exp pass.

    The own logit (x.x0 - ||x0||^2 / 2) / t^2 is the one the pass computed for that reference, so the
    weight is exp(l_own - m) / s1 (1 where a row had no reference: it falls back to its own image).
    """
    B = xl.shape[0]
    o = own.detach().reshape(B, -1).to(device=xl.device, dtype=xl.dtype)
    with torch.autocast(device_type=xl.device.type, enabled=False):
        l_own = ((xl * o).sum(dim=1) - 0.5 * (o * o).sum(dim=1)) * inv_t2
        empty = s1 == 0
        w = (l_own - torch.where(empty, l_own, m)).exp() / torch.where(empty, torch.ones_like(s1), s1)
    return torch.where(empty, torch.ones_like(w), w.clamp(max=1.0))


def sct_target_point(x_t, t, r, x0, eps, x0_hat) -> torch.Tensor:
    """SCT's target point x_hat_r = (r/t) x_t + (1 - r/t) x0_hat  (SCT Sec. 4.1 [RECON]; DDIM step with eps_hat).

    Requires x_t = x0 + t eps. It is computed in the algebraically equal form
    x0 + r eps + (1 - r/t)(x0_hat - x0): when x0_hat == x0 exactly the last term is exactly 0 and the
    result is bit-identical to :func:`ect_target_point` ("CT is a special case of SCT").
    """
    if x_t.shape != x0.shape or eps.shape != x0.shape or x0_hat.shape != x0.shape:
        raise ValueError("sct_target_point: x_t, x0, eps and x0_hat must share one shape, got "
                         f"{tuple(x_t.shape)}, {tuple(x0.shape)}, {tuple(eps.shape)}, {tuple(x0_hat.shape)}")
    t = _per_row(t, x0)
    r = _per_row(r, x0)
    return ect_target_point(x0, eps, r) + (1 - r / t) * (x0_hat - x0)


class ReferenceBank:
    """FIFO memory bank of past clean batches (+ labels): SCT's reference source 'bank' [RECON].

    A ring buffer of ``capacity`` rows, allocated on the first push. ``state_dict`` stores the buffer,
    write position and fill level, so a resumed run sees the same references in the same order.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"ReferenceBank capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._data: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._ptr = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @torch.no_grad()
    def push(self, x0: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        x0 = x0.detach()
        if labels is not None:
            labels = _class_index(labels).detach().to(x0.device)
            if labels.shape[0] != x0.shape[0]:
                raise ValueError(f"push: {x0.shape[0]} images but {labels.shape[0]} labels")
        if self._data is None:
            self._data = x0.new_zeros((self.capacity, *x0.shape[1:]))
            self._labels = None if labels is None else labels.new_zeros(self.capacity)
        if x0.shape[1:] != self._data.shape[1:]:
            raise ValueError(f"push: image shape {tuple(x0.shape[1:])} differs from the bank's {tuple(self._data.shape[1:])}")
        if (labels is None) != (self._labels is None):
            raise ValueError("push: the bank was created with" + ("out" if self._labels is None else "")
                             + " labels; push batches the same way")
        if self._data.device != x0.device:  # e.g. after load_state_dict on CPU
            self._data = self._data.to(x0.device)
            self._labels = None if self._labels is None else self._labels.to(x0.device)
        if x0.shape[0] > self.capacity:  # only the newest rows survive
            x0 = x0[-self.capacity:]
            labels = None if labels is None else labels[-self.capacity:]
        idx = (self._ptr + torch.arange(x0.shape[0], device=x0.device)) % self.capacity
        self._data[idx] = x0.to(self._data.dtype)
        if labels is not None:
            self._labels[idx] = labels
        self._ptr = (self._ptr + x0.shape[0]) % self.capacity
        self._count = min(self._count + x0.shape[0], self.capacity)

    def tensors(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(ref, ref_labels) of the filled rows; (None, None) while the bank is empty."""
        if self._data is None or self._count == 0:
            return None, None
        ref = self._data[: self._count]
        lab = None if self._labels is None else self._labels[: self._count]
        return ref, lab

    def state_dict(self) -> dict:
        out = {"capacity": self.capacity, "ptr": self._ptr, "count": self._count}
        if self._data is not None:
            out["data"] = self._data.clone()
            if self._labels is not None:
                out["labels"] = self._labels.clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"bank capacity mismatch: checkpoint {state['capacity']}, this bank {self.capacity}")
        self._ptr = int(state["ptr"])
        self._count = int(state["count"])
        self._data = state["data"].clone() if "data" in state else None
        self._labels = state["labels"].clone() if "labels" in state else None


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = x.contiguous()  # NCHW-contiguous, outputs included: NCCL gathers flat buffers, so layouts must agree
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


@torch.no_grad()
def gather_references(x0: torch.Tensor, labels: Optional[torch.Tensor], source: str,
                      bank: Optional[ReferenceBank] = None):
    """Reference set for :func:`posterior_mean`; the sample's own x0 is always included, once.

    * ``'batch'`` - the local batch;
    * ``'all'``   - the batches of all ranks (torch.distributed all_gather; equal batch shapes on every
      rank); the local batch when torch.distributed is not initialised. (A trainer with micro-batches gives
      :class:`sctlib.references.GatheredReferences` the whole step's batch instead: ``step_batch``.)
    * ``'bank'``  - the local batch followed by the bank's contents; the batch is pushed into the bank
      *after* reading, so it is not counted twice.

    Returns ``(ref, ref_labels)``; ref_labels is None when ``labels`` is None.
    """
    x0 = x0.detach()
    labels = None if labels is None else _class_index(labels).detach().to(x0.device)
    if source == "batch":
        return x0, labels
    if source == "all":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return _all_gather(x0), (None if labels is None else _all_gather(labels))
        return x0, labels
    if source == "bank":
        if bank is None:
            raise ValueError("reference source 'bank' needs a ReferenceBank (LossConfig.ref_size > 0)")
        old, old_labels = bank.tensors()
        if old is None:
            ref, ref_labels = x0, labels
        else:
            ref = torch.cat([x0, old.to(x0.dtype)])
            ref_labels = None if labels is None or old_labels is None else torch.cat([labels, old_labels])
        bank.push(x0, labels)
        return ref, ref_labels
    raise ValueError(f"unknown reference source {source!r}; valid: {', '.join(REF_SOURCES)}")
