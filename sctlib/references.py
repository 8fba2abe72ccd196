"""Reference sources of SCT's variance-reduced target: where the references of E[x0 | x_t] come from.

One interface (:class:`ReferenceSource`): ``source(x_t, t, x0, labels) -> (x0_hat, stats)`` returns the
self-normalised estimate x0_hat = sum_i w_i ref_i, w = softmax_i(-||x_t - ref_i||^2 / (2 t^2)) (SCT
Sec. 4.1, Eq. 13; Eq. 14 restricts the sum to the sample's class; the estimator of Xu, Tong, Jaakkola,
"Stable Target Field", ICLR 2023) and per-row statistics: 'ess' (1 / sum_i w_i^2), 'own_weight' (the
weight on the sample's own image), 'n_refs' (references the row may use), 'fallback' (rows without any).
The own image is always one of the references, exactly once, as in STF. ``state_dict`` /
``load_state_dict`` carry what a resumed run needs (a bank's contents; nothing for the others).

* ``'batch'`` / ``'all'`` / ``'bank'`` - :class:`GatheredReferences`: the local batch, the step's global
  batch (all ranks and micro-batches; the trainer passes it with each call as ``step_batch``), or the batch
  followed by a FIFO memory bank (:func:`sctlib.targets.gather_references`).
  With ``ref_per_class > 0`` the bank is :class:`ClassBalancedBank` (that many recent images per class).
* ``'dataset'`` - :class:`DatasetReferences`: the whole training set (or a fixed random subset of
  ``ref_size`` images), held on the device as uint8 when the images are on the uint8 grid and streamed in
  chunks; for a conditional model each sample sees only its own class, through a class-sorted copy with
  offsets. STF's analysis (bias and variance of the estimate fall as the reference set grows) and SCT's
  Fig. 4 ("stable target (all)" best) are the reason to use as many references as the device holds.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple, Optional, Tuple

import torch

from sctlib.targets import REF_SOURCES, ReferenceBank, _class_index, _per_row, gather_references, posterior_mean

__all__ = ["ReferenceSource", "StepBatch", "GatheredReferences", "ClassBalancedBank", "DatasetReferences",
           "build_references", "dataset_tensors", "REF_COMPUTES", "exact_fp32_matmul", "split_tf32"]

# How DatasetReferences computes the softmax: 'float64' (every logit and the weighted sum in float64; exact, the
# default - see LossConfig.ref_compute for the GPU timing behind that choice) or 'mixed' (fp32 screening + exact
# float64 top-k).
REF_COMPUTES = ("mixed", "float64")

Stats = dict


class StepBatch(NamedTuple):
    """The whole global batch of a training step, SCT's ``'all'`` reference set, and where the micro-batch of the
    current loss call sits in it (the trainer builds one per micro-batch: :class:`sctlib.train.Trainer`)."""

    x0: torch.Tensor                  # [N, ...]: every rank's micro-batches in global order
    labels: Optional[torch.Tensor]    # [N] class indices or [N, C] one-hot rows; None for an unlabelled set
    offset: int                       # row of the micro-batch's first image in x0


class ReferenceSource:
    """Interface: ``__call__(x_t, t, x0, labels, *, chunk_size, step_batch) -> (x0_hat, stats)``; labels None =
    unconditional. ``step_batch`` (:class:`StepBatch`), the whole step's global batch, is used only by the
    ``'all'`` source (:class:`GatheredReferences`); the others refuse it."""

    kind = "?"

    def __call__(self, x_t, t, x0, labels=None, *, chunk_size: int = 1024,
                 step_batch: Optional[StepBatch] = None) -> Tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def _refuse_step_batch(self, step_batch) -> None:
        if step_batch is not None:
            raise ValueError(f"step_batch applies to the 'all' reference source, not {self.kind!r}")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"reference source {self.kind!r} has no state, got keys {sorted(state)}")


class ClassBalancedBank:
    """Memory bank with ``per_class`` slots per class (FIFO within each class): SCT Eq. 14 with a stated
    number of same-class references, whatever the class frequencies in recent batches.

    Slots are one [C, K + 1, ...] buffer; the write position of a sample is its class pointer plus its rank
    among the same-class samples of the batch (a cumulative sum). Rows beyond the newest K of a class in
    one batch go to the spare slot K, which is never read, so no boolean indexing (a host sync on CUDA) is
    needed. ``tensors()`` returns the C x K slots with label -1 on the empty ones, which never match.
    """

    def __init__(self, num_classes: int, per_class: int):
        if num_classes < 1 or per_class < 1:
            raise ValueError(f"ClassBalancedBank needs num_classes >= 1 and per_class >= 1, got {num_classes}, {per_class}")
        self.num_classes, self.per_class = int(num_classes), int(per_class)
        self._data: Optional[torch.Tensor] = None
        self._ptr: Optional[torch.Tensor] = None    # [C] next slot per class (mod K)
        self._count: Optional[torch.Tensor] = None  # [C] filled slots per class

    def __len__(self) -> int:
        return 0 if self._count is None else int(self._count.sum())

    @torch.no_grad()
    def push(self, x0: torch.Tensor, labels: torch.Tensor) -> None:
        C, K = self.num_classes, self.per_class
        c = _class_index(labels).to(x0.device)
        if self._data is None:
            self._data = x0.new_zeros((C, K + 1, *x0.shape[1:]))
            self._ptr = torch.zeros(C, dtype=torch.int64, device=x0.device)
            self._count = torch.zeros(C, dtype=torch.int64, device=x0.device)
        if self._data.device != x0.device:
            self._data, self._ptr, self._count = (v.to(x0.device) for v in (self._data, self._ptr, self._count))
        onehot = torch.nn.functional.one_hot(c.clamp(0, C - 1), C)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1            # position among same-class rows of the batch
        n_c = onehot.sum(0)                                      # [C] rows per class in this batch
        keep = (rank >= n_c[c] - K) & (c >= 0) & (c < C)         # only the newest K per class survive
        slot = torch.where(keep, (self._ptr[c] + rank) % K, torch.full_like(rank, K))
        self._data[c.clamp(0, C - 1), slot] = x0.detach().to(self._data.dtype)
        self._ptr = (self._ptr + n_c) % K
        self._count = torch.minimum(self._count + n_c, torch.full_like(self._count, K))

    def tensors(self):
        if self._data is None:
            return None, None
        C, K = self.num_classes, self.per_class
        lab = torch.arange(C, device=self._data.device).repeat_interleave(K)
        filled = torch.arange(K, device=self._data.device)[None, :] < self._count[:, None]
        lab = torch.where(filled.reshape(-1), lab, torch.full_like(lab, -1))
        return self._data[:, :K].reshape(C * K, *self._data.shape[2:]), lab

    def state_dict(self) -> dict:
        out = {"num_classes": self.num_classes, "per_class": self.per_class}
        if self._data is not None:
            out.update(data=self._data.clone(), ptr=self._ptr.clone(), count=self._count.clone())
        return out

    def load_state_dict(self, state: dict) -> None:
        if (int(state["num_classes"]), int(state["per_class"])) != (self.num_classes, self.per_class):
            raise ValueError(f"class-balanced bank mismatch: checkpoint {state['num_classes']} classes x "
                             f"{state['per_class']}, this bank {self.num_classes} x {self.per_class}")
        self._data = state["data"].clone() if "data" in state else None
        self._ptr = state["ptr"].clone() if "ptr" in state else None
        self._count = state["count"].clone() if "count" in state else None


class GatheredReferences(ReferenceSource):
    """'batch', 'all' (all ranks) or 'bank': the reference set is gathered per step, own images first.

    'all' means the whole global batch of the step. A trainer that splits the step into micro-batches passes that
    batch with every call (``step_batch``, a :class:`StepBatch`: every rank's micro-batches in global order and the
    call's offset in it), so that the references, and with them the trained weights, do not depend on how the batch
    is split into processes and micro-batches; without it a call gathers the batch it is given from every rank
    (:func:`sctlib.targets.gather_references`). With a step batch the reference set is the call's own images (with
    their own labels) followed by the rest of the step in global order: the own image is a reference exactly once,
    whatever the rows at ``offset`` hold.
    """

    def __init__(self, kind: str, *, ref_size: int = 0, ref_per_class: int = 0, num_classes: int = 0):
        if kind not in ("batch", "all", "bank"):
            raise ValueError(f"GatheredReferences: kind must be batch, all or bank, got {kind!r}")
        self.kind = kind
        self.bank = None
        self.class_bank: Optional[ClassBalancedBank] = None
        if kind == "bank":
            if ref_per_class > 0:
                if num_classes < 1:
                    raise ValueError("loss.ref_per_class > 0 needs a labelled, class-conditional data set "
                                     "(net.label_dim > 0)")
                self.class_bank = ClassBalancedBank(num_classes, ref_per_class)
            elif ref_size < 1:
                raise ValueError(f"ref_source='bank' needs ref_size >= 1 (bank capacity in images) or "
                                 f"ref_per_class >= 1, got ref_size={ref_size}")
            else:
                self.bank = ReferenceBank(ref_size)

    def __call__(self, x_t, t, x0, labels=None, *, chunk_size: int = 1024, step_batch: Optional[StepBatch] = None):
        if step_batch is not None:
            if self.kind != "all":
                self._refuse_step_batch(step_batch)
            ref, ref_labels = self._from_step_batch(step_batch, x0, labels)
        elif self.class_bank is not None:
            if labels is None:
                raise ValueError("loss.ref_per_class > 0 needs labels (train with cond=True)")
            old, old_lab = self.class_bank.tensors()
            lab = _class_index(labels).to(x0.device)
            ref = x0.detach() if old is None else torch.cat([x0.detach(), old.to(x0.dtype)])
            ref_labels = lab if old is None else torch.cat([lab, old_lab])
            self.class_bank.push(x0, lab)
        else:
            ref, ref_labels = gather_references(x0, labels, self.kind, self.bank)
        return posterior_mean(x_t, t, ref, labels=labels, ref_labels=None if labels is None else ref_labels,
                              fallback=x0, chunk_size=chunk_size, return_stats=True, own=x0)

    @staticmethod
    def _from_step_batch(step_batch: StepBatch, x0, labels):
        """(ref, ref_labels): the call's own images first, then the step's other rows in global order."""
        if not isinstance(step_batch, StepBatch):
            raise TypeError(f"step_batch must be a sctlib.references.StepBatch, got {type(step_batch).__name__}")
        x_all, y_all, off = step_batch
        B = x0.shape[0]
        if x0.shape[1:] != x_all.shape[1:] or not 0 <= int(off) <= x_all.shape[0] - B:
            raise ValueError(f"step_batch holds {tuple(x_all.shape)}, not a batch with these {tuple(x0.shape)} images "
                             f"at row {off}")
        if labels is not None and y_all is None:
            raise ValueError("step_batch has no labels, but the loss asks for class-restricted references")
        off = int(off)
        x_all = x_all.detach().to(device=x0.device, dtype=x0.dtype)
        ref = torch.cat([x0.detach(), x_all[:off], x_all[off + B:]])
        if labels is None:
            return ref, None
        own = _class_index(labels).detach().to(x0.device)
        y_all = _class_index(y_all).detach().to(x0.device)
        return ref, torch.cat([own, y_all[:off], y_all[off + B:]])

    def state_dict(self) -> dict:
        if self.bank is not None:
            return {"bank": self.bank.state_dict()}
        if self.class_bank is not None:
            return {"class_bank": self.class_bank.state_dict()}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if self.bank is None and self.class_bank is None:
            return super().load_state_dict(state)
        key = "bank" if self.bank is not None else "class_bank"
        if key not in state:
            raise ValueError(f"reference source 'bank': the checkpoint state has no {key!r} entry")
        (self.bank if self.bank is not None else self.class_bank).load_state_dict(state[key])


# ------------------------------------------------------------------------------------------------
# The whole training set.

def dataset_tensors(dataset) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(images [N, ...], labels [N] or None) of a training set: in-memory sets via ``tensors()``; EDM zips
    decoded once into uint8 by a separate reader, so the training set (and what its DataLoader workers
    receive) stays as it is. x-flipped copies are not added: the own image is always a reference anyway.
    Decoding runs on one CPU core: ~1.3 M ImageNet-64 PNGs take minutes, once per process."""
    if hasattr(dataset, "tensors"):
        X, y = dataset.tensors()
        return X, y
    from sctlib.data import EDMZipDataset

    if isinstance(dataset, EDMZipDataset):
        reader = EDMZipDataset(dataset.path, cache=False, max_size=dataset.num_images)
        X = torch.empty((reader.num_images, *reader.shape), dtype=torch.uint8)
        for j in range(reader.num_images):
            X[j] = reader.image_uint8(j)
        reader.close()
        return X, dataset.labels()
    raise ValueError(f"ref_source='dataset' cannot read the images of {type(dataset).__name__}: it needs "
                     "tensors() or an EDM zip data set")


def _to_store(X: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """uint8 when every pixel lies on EDM's grid x = u / 127.5 - 1 (4x less memory), else float32."""
    if X.dtype == torch.uint8:
        return X, True
    Xf = X.detach().float()
    u = ((Xf + 1.0) * 127.5).round()
    if bool(((u >= 0) & (u <= 255)).all()) and bool(((u / 127.5 - 1.0) - Xf).abs().max() <= 1e-6):
        return u.to(torch.uint8), True
    return Xf, False


class DatasetReferences(ReferenceSource):
    """References drawn from the whole training set (``ref_source='dataset'``).

    The images live on the device as uint8 (CIFAR-10: 50,000 x 3,072 = 150 MB; ImageNet-64: 1.28 M x
    12,288 = 15.7 GB) or float32 when they are not on the uint8 grid (digits, 2-D toys), sorted by class
    with offsets [C + 1] for conditional models. Chunks are converted to float on the fly; the logits and
    the log-sum-exp run in float64 (see :func:`sctlib.targets.posterior_mean` for why). ||ref||^2 is
    computed once.

    The own image enters explicitly, exactly once: a stored image within RMS ``dup_rms`` of the row's own
    image counts as that image and is skipped (that also removes the quantised copy of the own image,
    and makes x-flip augmentation or a subset of the data set harmless). Unconditional: one GEMM
    [2B, d] x [d, chunk] per chunk (query x_t and own x0 share each read of the chunk). Conditional: per-row
    windows of the class-sorted store. On CUDA (``fused=None``, when Triton imports) the float64 pass runs two
    fused kernels (:mod:`sctlib._triton_refs`) that read each row's window of stored values once per pass and
    accumulate in float64 in registers; otherwise ``rows`` references of every row's class per step are
    gathered and converted, as a batched matrix-vector product; the number of steps is fixed by the largest
    class (no host sync).

    ``compute`` picks the arithmetic (both give the same weights to within the bound below):

    * ``'float64'`` (default) - every logit, the streamed log-sum-exp and the weighted sum in float64 (the
      exact reference; each chunk of stored values u is converted to float64, 8 bytes per element, per row
      in the conditional path, and ref = a u + b is applied to the products, not to the elements).
    * ``'mixed'`` - see :meth:`_mixed`: screening logits of every reference from a float32
      GEMM on the raw uint8 values u (exact in float32; ref = u / 127.5 - 1 applied algebraically, TF32
      forced off for the call), then the ``topk`` largest logits of each row recomputed in float64 from
      differences ||x_t - ref||^2, the own image exact, and x0_hat = sum_j w_j ref_j with the top-k terms
      in float64 and the rest as a float32 GEMM of normalised weights.
    """

    kind = "dataset"

    def __init__(self, X: torch.Tensor, labels: Optional[torch.Tensor] = None, *, ref_size: int = 0,
                 seed: int = 0, device=None, dup_rms: float = 0.005, elements_per_chunk: int = 2**26,
                 compute: str = "float64", topk: int = 16, split_tf32: Optional[bool] = None,
                 fused: Optional[bool] = None):
        if compute not in REF_COMPUTES:
            raise ValueError(f"DatasetReferences: compute must be one of {', '.join(REF_COMPUTES)}, got {compute!r}")
        if topk < 1:
            raise ValueError(f"DatasetReferences: topk must be >= 1, got {topk}")
        self.compute, self.topk = compute, int(topk)
        # Unconditional 'mixed' GEMMs on TF32 tensor cores with the float32 operand split into three
        # TF32-exact pieces (:func:`split_tf32`): the products are those of a float32 GEMM. None = on CUDA
        # only (on a CPU the split only triples the work).
        self.split_tf32 = split_tf32
        # Conditional float64 pass through the fused Triton kernels (sctlib._triton_refs). None = on CUDA when
        # Triton imports; True forces them (on a CPU only under TRITON_INTERPRET=1, as the tests run them).
        self.fused = fused
        if X.ndim < 2 or X.shape[0] < 1:
            raise ValueError(f"DatasetReferences: need images [N, ...] with N >= 1, got shape {tuple(X.shape)}")
        device = torch.device(device) if device is not None else X.device
        n = X.shape[0]
        if ref_size and ref_size < n:  # a fixed random subset, the same on every rank and after a resume
            g = torch.Generator().manual_seed(int(seed) * 7919 + 0x5C7)
            keep = torch.randperm(n, generator=g)[:ref_size].sort().values
            X = X[keep.to(X.device)]
            labels = None if labels is None else labels[keep.to(labels.device)]
        store, self.is_uint8 = _to_store(X)
        self.item_shape = tuple(X.shape[1:])
        self.d = int(math.prod(self.item_shape))
        # On the device before sorting: the class-sorted copy then never doubles host memory (ImageNet-64:
        # 15.7 GB per process).
        store = store.reshape(store.shape[0], self.d).to(device)
        self.labels_sorted = None
        self.offsets = None
        if labels is not None:
            lab = _class_index(labels).cpu()
            if bool((lab < 0).any()):
                raise ValueError("DatasetReferences: the data set has unlabelled images (label -1)")
            order = torch.argsort(lab, stable=True)
            store = store[order.to(store.device)]
            lab = lab[order]
            C = int(lab.max()) + 1
            counts = torch.bincount(lab, minlength=C)
            self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(device)
            self.max_class = int(counts.max())
            self.num_classes = C
            self.labels_sorted = lab.to(device)
        self.store = store.contiguous()
        # ||ref||^2 of the stored (dequantised) images, once, in float64.
        sq = torch.empty(self.store.shape[0], dtype=torch.float64, device=device)
        for s in range(0, self.store.shape[0], 4096):
            r = self._deq(self.store[s:s + 4096], torch.float64)
            sq[s:s + 4096] = (r * r).sum(1)
        self.sq = sq
        self.dup_d2 = float(dup_rms) ** 2 * self.d
        self.elements_per_chunk = int(elements_per_chunk)

    def __len__(self) -> int:
        return self.store.shape[0]

    @property
    def nbytes(self) -> int:
        return self.store.numel() * self.store.element_size()

    def _use_fused(self, dev: torch.device) -> bool:
        from . import _triton_refs
        if self.fused is None:
            return dev.type == "cuda" and _triton_refs.AVAILABLE
        if self.fused and not _triton_refs.AVAILABLE:
            raise RuntimeError("DatasetReferences(fused=True) needs Triton, which is not installed")
        return bool(self.fused)

    def _try_fused(self, x, o, o_sq, inv_t2, l_own, labels, a: float, b: float):
        """The class pass through the fused kernels; on a failure of the kernels (a Triton or driver version
        that cannot build them) a warning, the PyTorch path from then on (``fused=None``), or the error
        (``fused=True``)."""
        try:
            return self._class_pass_fused(x, o, o_sq, inv_t2, l_own, labels, a, b)
        except torch.OutOfMemoryError:
            raise  # a memory error is the caller's to see, not a kernel that failed to build
        except Exception as exc:  # noqa: BLE001 - any kernel failure falls back to the exact PyTorch path
            if self.fused:
                raise
            warnings.warn(f"DatasetReferences: the fused reference kernels failed ({type(exc).__name__}: {exc}); "
                          "using the PyTorch path", RuntimeWarning, stacklevel=3)
            self.fused = False
            return None

    def _class_pass_fused(self, x, o, o_sq, inv_t2, l_own, labels, a: float, b: float):
        """One pass of fused kernels over each row's class window (:mod:`sctlib._triton_refs`): the raw stored
        values are read once per pass and accumulated in float64 in registers; the logits of the whole window
        [B, max_class] are small, so the softmax is taken at once, not streamed. Returns (m, s1, s2, acc,
        references counted per row, logits)."""
        from . import _triton_refs

        dev = self.store.device
        c = _class_index(labels).to(dev)
        lo, hi = self.offsets[c], self.offsets[c + 1]
        n_c = hi - lo
        N = self.max_class
        q = torch.stack([x, o], dim=1)                                    # [B, 2, d]
        dots = _triton_refs.class_dots(q, self.store, lo, n_c, N) * a + q.sum(2, keepdim=True) * b
        ar = torch.arange(N, device=dev)
        valid = ar[None, :] < n_c[:, None]
        idx = torch.where(valid, lo[:, None] + ar[None, :], lo[:, None])
        sq = self.sq[idx]
        logits = (dots[:, 0] - 0.5 * sq) * inv_t2[:, None]
        dup = (o_sq[:, None] - 2 * dots[:, 1] + sq) <= self.dup_d2        # stored copies of the own image
        ok = valid & ~dup
        logits = logits.masked_fill(~ok, float("-inf"))
        m = torch.maximum(l_own, logits.max(dim=1).values)
        p = (logits - m[:, None]).exp()
        p_own = (l_own - m).exp()
        s1 = p_own + p.sum(1)
        s2 = p_own * p_own + (p * p).sum(1)
        acc = p_own[:, None] * o + _triton_refs.class_weighted_sum(p, self.store, lo, n_c) * a \
            + p.sum(1, keepdim=True) * b
        return m, s1, s2, acc, ok.sum(1), logits

    def _deq(self, R: torch.Tensor, dtype) -> torch.Tensor:
        return R.to(dtype) / 127.5 - 1.0 if self.is_uint8 else R.to(dtype)

    def _affine(self) -> Tuple[float, float]:
        """(a, b) with ref = a * stored + b: (1/127.5, -1) for the uint8 grid, (1, 0) for a float32 store."""
        return (1.0 / 127.5, -1.0) if self.is_uint8 else (1.0, 0.0)

    @torch.no_grad()
    def __call__(self, x_t, t, x0, labels=None, *, chunk_size: int = 1024, compute: Optional[str] = None,
                 return_weights: bool = False, step_batch=None):
        """x0_hat and stats; ``compute`` overrides the instance's mode for this call. ``return_weights``
        (diagnostics, memory B x N) adds 'weights' [B, N] (unconditional: over the store; conditional: over
        the row's class window, position j = store row offsets[c] + j; 0 on skipped copies of the own image
        and padding) in float64; the own image's weight is 'own_weight'."""
        self._refuse_step_batch(step_batch)  # the whole training set: a step's batch is not its reference set
        B = x_t.shape[0]
        if tuple(x_t.shape[1:]) != self.item_shape:
            raise ValueError(f"DatasetReferences holds images of shape {self.item_shape}, got {tuple(x_t.shape[1:])}")
        if labels is not None and self.offsets is None:
            raise ValueError("DatasetReferences was built without labels; the loss asked for class-conditional "
                             "references")
        compute = self.compute if compute is None else compute
        if compute not in REF_COMPUTES:
            raise ValueError(f"DatasetReferences: compute must be one of {', '.join(REF_COMPUTES)}, got {compute!r}")
        if compute == "mixed":
            with exact_fp32_matmul():
                return self._mixed(x_t, t, x0, labels, chunk_size, return_weights)
        dev = self.store.device
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        ldt = torch.float64
        x = x_t.detach().reshape(B, -1).to(device=dev, dtype=ldt)
        o = x0.detach().reshape(B, -1).to(device=dev, dtype=ldt)
        inv_t2 = 1.0 / _per_row(t, x_t).reshape(B).to(device=dev, dtype=ldt).clamp(min=1e-12) ** 2
        o_sq = (o * o).sum(1)
        # ref = a u + b on the stored values u, applied algebraically to the products (q.ref = a q.u + b sum q,
        # sum_j p_j ref_j = a sum_j p_j u_j + b sum_j p_j): each chunk is converted once to float64 and never
        # dequantised elementwise (two more float64 passes over B x rows x d elements in the conditional path).
        a, b = self._affine()
        with torch.autocast(device_type=dev.type, enabled=False):
            # The own image first: logit l_own, weight 1 relative to itself.
            l_own = ((x * o).sum(1) - 0.5 * o_sq) * inv_t2
            m = l_own.clone()
            s1 = torch.ones(B, dtype=ldt, device=dev)
            s2 = torch.ones(B, dtype=ldt, device=dev)
            acc = o.clone()
            n_refs = torch.ones(B, dtype=ldt, device=dev)
            cond = labels is not None
            all_logits = []
            if not cond:
                step = max(1, min(chunk_size, self.elements_per_chunk // max(self.d, 1)))
                q = torch.cat([x, o])  # [2B, d]: one read of each chunk serves both products
                q_b = q.sum(1, keepdim=True) * b                        # b sum(q): the affine part of q.ref
                for s in range(0, self.store.shape[0], step):
                    U = self.store[s:s + step].to(ldt)                    # raw stored values, exact in float64
                    dots = (q @ U.T) * a + q_b                            # q.ref = a (q.u) + b sum(q), [2B, n_c]
                    sq = self.sq[s:s + step]
                    logits = (dots[:B] - 0.5 * sq) * inv_t2[:, None]
                    dup = (o_sq[:, None] - 2 * dots[B:] + sq) <= self.dup_d2  # the own image's stored copy
                    logits = logits.masked_fill(dup, float("-inf"))
                    n_refs += (~dup).sum(1)
                    if return_weights:
                        all_logits.append(logits)
                    m, s1, s2, acc = _lse_update(m, s1, s2, acc, logits,
                                                 lambda p: (p @ U) * a + p.sum(1, keepdim=True) * b)
            elif self._use_fused(dev) and (res := self._try_fused(x, o, o_sq, inv_t2, l_own, labels, a, b)):
                m, s1, s2, acc, n_ok, logits = res
                n_refs += n_ok
                if return_weights:
                    all_logits.append(logits)
            else:
                c = _class_index(labels).to(dev)
                lo, hi = self.offsets[c], self.offsets[c + 1]
                rows = max(1, min(self.max_class, self.elements_per_chunk // max(B * self.d, 1)))
                ar = torch.arange(rows, device=dev)
                q = torch.stack([x, o], dim=1)  # [B, 2, d]
                q_b = q.sum(2, keepdim=True) * b                          # [B, 2, 1]
                for j in range(0, self.max_class, rows):
                    idx = lo[:, None] + j + ar[None, :]                   # [B, rows]
                    valid = idx < hi[:, None]
                    idx = torch.where(valid, idx, lo[:, None])
                    U = self.store[idx].to(ldt)                           # [B, rows, d], raw values
                    dots = torch.bmm(q, U.transpose(1, 2)) * a + q_b      # [B, 2, rows]
                    sq = self.sq[idx]
                    logits = (dots[:, 0] - 0.5 * sq) * inv_t2[:, None]
                    dup = (o_sq[:, None] - 2 * dots[:, 1] + sq) <= self.dup_d2
                    ok = valid & ~dup
                    logits = logits.masked_fill(~ok, float("-inf"))
                    n_refs += ok.sum(1)
                    if return_weights:
                        all_logits.append(logits)
                    m, s1, s2, acc = _lse_update(m, s1, s2, acc, logits,
                                                 lambda p: torch.bmm(p[:, None, :], U)[:, 0] * a
                                                 + p.sum(1, keepdim=True) * b)
        x0_hat = (acc / s1[:, None]).to(dtype).reshape(x_t.shape).to(x_t.device)
        ess = s1 * s1 / s2
        w_own = ((l_own - m).exp() / s1).clamp(max=1.0)  # the own term of s1 is exp(l_own - m)
        stats = {"fallback": torch.zeros((), dtype=torch.int64, device=dev), "ess": ess,
                 "own_weight": w_own, "n_refs": n_refs}
        if return_weights:
            width = self.max_class if cond else self.store.shape[0]
            stats["weights"] = ((torch.cat(all_logits, 1)[:, :width] - m[:, None]).exp() / s1[:, None])
        return x0_hat, stats


    def _mixed(self, x_t, t, x0, labels, chunk_size: int, return_weights: bool):
        """``compute='mixed'``: float32 screening, exact float64 top-k, exact own image.

        Logits are taken relative to the own image's, l_i = (||x - o||^2 - ||x - ref_i||^2) / (2 t^2)
        (x = x_t, o = x0; SCT Eq. 13, Eq. 14 over the row's class), so the own image has l = 0 exactly and
        the frame never depends on the screening arithmetic.

        1. Screening (every reference): l~_i = (x.ref_i - x.o - (||ref_i||^2 - ||o||^2) / 2) / t^2 with x.ref_i =
           a (x.u_i) + b sum(x) from a float32 GEMM on the stored values u_i (uint8 -> float32 is exact;
           ref = a u + b, (a, b) = (1/127.5, -1)). TF32 is off for the call (:func:`exact_fp32_matmul`):
           its 10-bit inputs would put ~1e-3 |x||u| into every dot. Unconditional, on CUDA, the GEMM runs on
           TF32 tensor cores all the same, but with the float32 operand split into three TF32-exact pieces
           (:func:`split_tf32`; u <= 255 is exact in TF32), so every product is exact and the result is that
           of a float32 GEMM. Either way the error of a dot is the float32 accumulation error, |e_i| <~ c eps32 sum_k |x_k u_k|
           (eps32 = 6e-8; c ~ sqrt(log d) for cuBLAS' blocked sums), i.e. |l~_i - l_i| <= E(t) = e_dot a / t^2.
           The copies of the own image (||o - ref_i||^2 <= d dup_rms^2) are skipped on the same dots.
        2. Exact top-k: the ``topk`` largest l~ of each row are recomputed in float64 from differences,
           (||x - o||^2 - ||x - ref_j||^2) / (2 t^2): the error is ~1e-16 of ||x - ref||^2 / t^2 ~ d, whatever t.
        3. Weights w = softmax over [0 (own), top-k exact, the rest screened], in float64; x0_hat = w_own o +
           sum_topk w_j ref_j (float64, from the gathered rows) + a (w_rest @ u) + b sum(w_rest) (a float32
           GEMM of normalised weights: relative error ~eps32 of a convex combination).

        Why the error is bounded where it matters. Only screened (non-top-k) references carry an error,
        and each of their weights is off by at most a factor exp(+-E(t)), so
        sum_i |dw_i| <= (exp(E) - 1) W_rest, W_rest = their total weight, and, because sum_i dw_i = 0,
        ||dx0_hat|| <= (exp(E) - 1) W_rest max_i ||ref_i - x0_hat||. The two factors never grow together:
        at small t, E is large (E ~ |x||u| eps32 / (127.5 t^2): ~1e2 nats at t = 0.002 for ImageNet-64),
        but then every reference other than the own image and its near-duplicates lies
        >= ||ref - x0||^2 / (2 t^2) ~ 1e5 nats below the top (W_rest ~ exp(-1e5) = 0); near-duplicates
        (a few uint8 levels apart, ~1e-4 in ||.||^2) are within E of the top, hence in the top-k and exact.
        At large t, W_rest is O(1) (the weight spreads, STF's regime) but E ~ eps32 d / t is small
        (|x| ~ t sqrt(d)): ~1e-3 nats at t = 1, less beyond. What the consistency target uses is the
        score estimate eps_hat = (x_t - x0_hat) / t (SCT Eq. 13; the stable target field of Xu, Tong,
        Jaakkola 2023), through x_hat_r = x_t - (t - r) eps_hat, so the error that matters is
        ||dx0_hat|| / ||x_t - x0_hat||, the relative error of eps_hat; with ||x_t - x0_hat|| ~ t sqrt(d) it
        stays <~ 1e-4 over t in [0.002, 80] (measured ~1e-6 on CPU); tests/test_references.py
        and benchmarks/reference_cost.py measure it against ``compute='float64'`` on data with
        near-duplicates. A ref within ~E(t) of the top that falls outside the top-k (more than ``topk``
        near-ties) keeps only a screened logit: raise ``topk`` for data sets with many exact duplicates.
        The own image stays exactly once (explicit, l = 0); whether a stored image is a copy of it is
        decided on float32 dots, which can differ from float64 only for an image within ~1e-3 (relative)
        of the dup_rms threshold.

        Memory: screening logits [B, N] float32 (N = store rows, or the largest class when conditional).
        The conditional path gathers each row's window as uint8 and converts it to float32 (not float64)
        once per pass; it reads the windows twice (logits, then the weighted sum).
        """
        B = x_t.shape[0]
        dev = self.store.device
        f64, f32 = torch.float64, torch.float32
        out_dtype = torch.promote_types(x_t.dtype, f32)
        a, b = self._affine()
        with torch.autocast(device_type=dev.type, enabled=False):
            x = x_t.detach().reshape(B, -1).to(device=dev, dtype=f64)
            o = x0.detach().reshape(B, -1).to(device=dev, dtype=f64)
            inv_t2 = 1.0 / _per_row(t, x_t).reshape(B).to(device=dev, dtype=f64).clamp(min=1e-12) ** 2
            o_sq = (o * o).sum(1)
            xo = (x * o).sum(1)
            d_own = ((x - o) ** 2).sum(1)                       # ||x - o||^2 from differences
            q = torch.cat([x, o]).to(f32)                       # [2B, d]: x_t and x0 share each read of u
            q_sum = q.double().sum(1) * b                       # b sum(q): the affine part of q.ref
            xs, os_ = q_sum[:B, None], q_sum[B:, None]
            cond = labels is not None
            N = self.max_class if cond else self.store.shape[0]
            L = torch.empty((B, N), dtype=f32, device=dev)      # screening logits (relative to the own image)
            n_refs = torch.ones(B, dtype=f64, device=dev)

            def screen(dx, do, sq, ok=None):
                # dx = q.u for x, do = for o (float32 dots) -> float64 logits and the own-copy test.
                dx, do = dx.double() * a + xs, do.double() * a + os_
                logits = ((dx - xo[:, None]) - 0.5 * (sq - o_sq[:, None])) * inv_t2[:, None]
                keep = (o_sq[:, None] - 2 * do + sq) > self.dup_d2
                keep = keep if ok is None else keep & ok
                return logits.masked_fill(~keep, float("-inf")).to(f32), keep.sum(1)

            # The split needs the stored operand exact in TF32: the uint8 grid is (8 bits), a float32 store
            # (digits, 2-D toys) is not, so that one keeps plain float32 GEMMs.
            split = self.is_uint8 and ((dev.type == "cuda") if self.split_tf32 is None else bool(self.split_tf32))
            if not cond:
                step = max(1, min(chunk_size, self.elements_per_chunk // max(self.d, 1)))
                chunks = [(s, min(s + step, N)) for s in range(0, N, step)]
                q_in = split_tf32(q) if split else q                   # [6B, d] or [2B, d]
                for s, e in chunks:
                    U = self.store[s:e].to(f32)                         # u <= 255: exact in float32 and TF32
                    with _tf32(split):
                        dots = _mm(q_in, U.T)                           # [6B, n_c] / [2B, n_c]
                    if split:
                        dots = dots.double().reshape(3, 2 * B, -1).sum(0)  # exact pieces: float32 GEMM products
                    L[:, s:e], n = screen(dots[:B], dots[B:], self.sq[None, s:e])
                    n_refs += n
                lo = None
            else:
                c = _class_index(labels).to(dev)
                lo, hi = self.offsets[c], self.offsets[c + 1]
                rows = max(1, min(N, self.elements_per_chunk // max(B * self.d, 1)))
                ar = torch.arange(rows, device=dev)
                q3 = torch.stack([q[:B], q[B:]], dim=1)                 # [B, 2, d]
                chunks = [(j, min(j + rows, N)) for j in range(0, N, rows)]
                kept = None
                for j, e in chunks:
                    idx = lo[:, None] + j + ar[None, :e - j]
                    valid = idx < hi[:, None]
                    idx = torch.where(valid, idx, lo[:, None])
                    U = self.store[idx].to(f32)                         # [B, rows, d]: uint8 gather, 4 B/elem
                    dots = _mm(q3, U.transpose(1, 2))                   # [B, 2, rows], TF32 off
                    L[:, j:e], n = screen(dots[:, 0], dots[:, 1], self.sq[idx], valid)
                    n_refs += n
                    if len(chunks) == 1:
                        kept = U                                        # one chunk: reuse it for the sum

            # Exact float64 logits of the top-k screened references, from differences.
            k = min(self.topk, N)
            top, pos = L.topk(k, dim=1)                                 # [B, k]
            gidx = pos if lo is None else (lo[:, None] + pos).clamp(max=self.store.shape[0] - 1)
            Rk = self._deq(self.store[gidx], f64)                       # [B, k, d]
            lk = 0.5 * (d_own[:, None] - ((x[:, None, :] - Rk) ** 2).sum(-1)) * inv_t2[:, None]
            lk = torch.where(torch.isfinite(top), lk, torch.full_like(lk, float("-inf")))
            lrest = L.double().scatter(1, pos, float("-inf"))           # the screened rest
            m = torch.maximum(torch.maximum(lrest.max(1).values, lk.max(1).values), torch.zeros_like(d_own))
            prest = (lrest - m[:, None]).exp()
            pk = (lk - m[:, None]).exp()
            pown = (-m).exp()
            s1 = pown + prest.sum(1) + pk.sum(1)
            w_rest, w_k, w_own = prest / s1[:, None], pk / s1[:, None], pown / s1
            ess = 1.0 / (w_own * w_own + (w_rest * w_rest).sum(1) + (w_k * w_k).sum(1))
            acc = w_own[:, None] * o + (w_k[:, :, None] * Rk).sum(1)   # float64: the terms that dominate
            # The rest: a (w @ u) + b sum(w), float32 GEMMs of normalised weights.
            wr32 = w_rest.to(f32)
            rest_u = torch.zeros((B, self.d), dtype=f32, device=dev)
            if not cond:
                w_in = split_tf32(wr32) if split else wr32
                for s, e in chunks:
                    with _tf32(split):
                        part = _mm(w_in[:, s:e], self.store[s:e].to(f32))
                    rest_u += part.reshape(3, B, -1).sum(0) if split else part
            else:
                for j, e in chunks:
                    if kept is None:
                        idx = lo[:, None] + j + ar[None, :e - j]
                        idx = torch.where(idx < hi[:, None], idx, lo[:, None])
                        U = self.store[idx].to(f32)
                    else:
                        U = kept
                    rest_u += _mm(wr32[:, None, j:e], U)[:, 0]
            acc = acc + rest_u.double() * a + b * w_rest.sum(1, keepdim=True)
        x0_hat = acc.to(out_dtype).reshape(x_t.shape).to(x_t.device)
        stats = {"fallback": torch.zeros((), dtype=torch.int64, device=dev), "ess": ess,
                 "own_weight": w_own.clamp(max=1.0), "n_refs": n_refs}
        if return_weights:
            stats["weights"] = w_rest.scatter(1, pos, w_k)
        return x0_hat, stats


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The float32 (batched) matmuls of the mixed path, in one place: the tests replace it with an emulation
    of TF32 tensor cores (inputs truncated to 10 mantissa bits while the TF32 flag is on)."""
    return torch.matmul(a, b)


def split_tf32(q: torch.Tensor) -> torch.Tensor:
    """[3M, ...] = (hi, mid, lo) with hi + mid + lo == q exactly and every piece exact in TF32.

    TF32 keeps 10 of float32's 23 stored mantissa bits. hi = q with the low 13 bits cleared; mid = the same
    for q - hi (exact: the low bits of q); lo = the rest (<= 2 significant bits). With the other operand
    exact in TF32 too (uint8 values u <= 255: 8 bits), every product piece x u is exact in float32, so a
    TF32 tensor-core GEMM of the pieces carries only the float32 accumulation error: a float32 GEMM at
    tensor-core speed (3x the flops, several times the rate of float32 CUDA cores on Hopper).
    """
    q = q.contiguous().to(torch.float32)
    mask = -(1 << 13)  # 0xFFFFE000: sign, exponent, top 10 mantissa bits
    hi = (q.view(torch.int32) & mask).view(torch.float32)
    r = q - hi
    mid = (r.view(torch.int32) & mask).view(torch.float32)
    return torch.cat([hi, mid, r - mid])


@contextlib.contextmanager
def _tf32(on: bool):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@contextlib.contextmanager
def exact_fp32_matmul():
    """float32 matmuls in full float32 inside the block (TF32 off: its 10-bit mantissa inputs would put
    errors of ~1e-3 |x||ref| into the screening logits), the caller's global switches restored after."""
    # Only the switch the trainer sets (sctlib.precision.set_tf32): torch.set_float32_matmul_precision
    # here would put the per-backend settings in a "mixed legacy / new API" state, in which
    # torch.get_float32_matmul_precision() raises.
    prev_flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_flag


def _lse_update(m, s1, s2, acc, logits, weighted_sum):
    """One streamed log-sum-exp step over a chunk of logits [B, n_c] (float64), -inf = excluded."""
    m_new = torch.maximum(m, logits.max(dim=1).values)  # m is finite (the own logit), so m_new is too
    scale = (m - m_new).exp()
    p = (logits - m_new[:, None]).exp()
    return m_new, s1 * scale + p.sum(1), s2 * scale * scale + (p * p).sum(1), \
        acc * scale[:, None] + weighted_sum(p)


def build_references(cfg, *, dataset=None, num_classes: int = 0, device=None, seed: int = 0) -> ReferenceSource:
    """The reference source a :class:`~sctlib.config.LossConfig` names (``loss.ref_source``).

    'dataset' needs the training set (``dataset``: a data set object or an (images, labels) pair); the
    labels are kept only when ``num_classes > 0`` and ``cfg.ref_conditional`` (class-conditional model).
    """
    kind = cfg.ref_source
    if kind not in REF_SOURCES:
        raise ValueError(f"unknown loss.ref_source {kind!r}; valid: {', '.join(REF_SOURCES)}")
    if cfg.ref_per_class < 0 or cfg.ref_size < 0:
        raise ValueError(f"loss.ref_size and loss.ref_per_class must be >= 0, got {cfg.ref_size}, {cfg.ref_per_class}")
    if cfg.ref_per_class and kind != "bank":
        raise ValueError(f"loss.ref_per_class={cfg.ref_per_class} applies to ref_source='bank' only (got {kind!r})")
    if kind != "dataset":
        return GatheredReferences(kind, ref_size=cfg.ref_size, ref_per_class=cfg.ref_per_class,
                                  num_classes=num_classes)
    if dataset is None:
        raise ValueError("loss.ref_source='dataset' needs the training set: build the loss with "
                         "build_loss(cfg, references=build_references(cfg, dataset=...)) (the trainer does)")
    X, y = dataset if isinstance(dataset, tuple) else dataset_tensors(dataset)
    keep_labels = y is not None and num_classes > 0 and cfg.ref_conditional
    return DatasetReferences(X, y if keep_labels else None, ref_size=cfg.ref_size, seed=seed, device=device,
                             compute=getattr(cfg, "ref_compute", "float64"))
