"""Fused Triton kernels of the class-restricted reference pass (``DatasetReferences``, float64).

For a conditional model each row b of the batch is compared with the references of its own class, a window
``store[lo_b : lo_b + n_b]`` of the class-sorted uint8 store (ImageNet-64: n_b ~ 1,300 images of d = 12,288
values). The plain PyTorch path gathers every row's window into a [B, rows, d] tensor and converts it to
float64 before two batched matrix products: about 2 G elements per step of 128 rows, each written and read in
float64, so the pass is bound by memory traffic (tens of ms on an H200 against a 0.5 s EDM2-S step). The two
kernels here read the uint8 window directly and accumulate in float64 in registers, so each stored byte is
read once per pass and nothing [B, rows, d]-sized is ever written:

* :func:`class_dots` - ``out[b, 0, j] = q[b, 0] . u[lo_b + j]`` and ``out[b, 1, j] = q[b, 1] . u[lo_b + j]``
  for j < n_b (0 beyond), the products the logits and the own-copy test need (SCT Eq. 13-14 over the class).
* :func:`class_weighted_sum` - ``out[b] = sum_{j < n_b} p[b, j] u[lo_b + j]``, the weighted sum of the
  posterior mean before its affine map.

Both work on the raw stored values u; the caller applies ref = a u + b to the products. Every product and sum
is float64 (u <= 255 is exact), so the result equals the PyTorch float64 path up to the order of summation.
On a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before the import), which is
how the tests check them against the PyTorch path.
"""
from __future__ import annotations

import torch

try:  # Triton ships with the CUDA builds of PyTorch; absent elsewhere (then the PyTorch path is used).
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"
    triton = None

AVAILABLE = triton is not None

if AVAILABLE:

    # Both kernels keep 2-D float64 accumulators [BLOCK_N, BLOCK_K] and reduce once at the end: the loop body
    # is elementwise fused multiply-adds (no cross-thread reduction per tile), which keeps the register use of
    # the float64 tiles low enough for the compiler not to spill. ptxas -v for sm_90 (Triton 3.8, 4 warps):
    # tiles 16 x 64 use 94 registers (dots) and 56 (weighted sum), no spills; 32 x 128 spilled. The tile
    # sizes are arguments of the wrappers below; their GPU timing is benchmarks/reference_cost.py's.

    @triton.jit
    def _class_dots_kernel(q_ptr, store_ptr, lo_ptr, n_ptr, out_ptr, d, max_n,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        b = tl.program_id(0)
        jb = tl.program_id(1)
        lo = tl.load(lo_ptr + b)                     # int64: row offsets reach 1.28 M x 12,288 > 2^31
        n = tl.load(n_ptr + b)
        offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        rows = (lo + offs_n).to(tl.int64) * d
        acc_x = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64)
        acc_o = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64)
        q_row = q_ptr + b.to(tl.int64) * 2 * d
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < d
            qx = tl.load(q_row + offs_k, mask=mask_k, other=0.0)
            qo = tl.load(q_row + d + offs_k, mask=mask_k, other=0.0)
            u = tl.load(store_ptr + rows[:, None] + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0).to(tl.float64)
            acc_x += u * qx[None, :]
            acc_o += u * qo[None, :]
        out_row = out_ptr + b.to(tl.int64) * 2 * max_n
        keep = offs_n < max_n
        tl.store(out_row + offs_n, tl.sum(acc_x, axis=1), mask=keep)
        tl.store(out_row + max_n + offs_n, tl.sum(acc_o, axis=1), mask=keep)

    @triton.jit
    def _class_wsum_kernel(p_ptr, store_ptr, lo_ptr, n_ptr, out_ptr, d, max_n,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        b = tl.program_id(0)
        kb = tl.program_id(1)
        lo = tl.load(lo_ptr + b)
        n = tl.load(n_ptr + b)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float64)
        p_row = p_ptr + b.to(tl.int64) * max_n
        for j0 in range(0, max_n, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n
            p = tl.load(p_row + offs_n, mask=mask_n, other=0.0)
            rows = (lo + offs_n).to(tl.int64) * d
            u = tl.load(store_ptr + rows[:, None] + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0).to(tl.float64)
            acc += u * p[:, None]
        tl.store(out_ptr + b.to(tl.int64) * d + offs_k, tl.sum(acc, axis=0), mask=mask_k)


def _check(store: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, B: int):
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed: the fused reference kernels are unavailable")
    if store.ndim != 2 or not store.is_contiguous():
        raise ValueError(f"store must be a contiguous [N, d] tensor, got shape {tuple(store.shape)}")
    if lo.shape != (B,) or n.shape != (B,):
        raise ValueError(f"lo and n must have shape [{B}], got {tuple(lo.shape)} and {tuple(n.shape)}")


def class_dots(q: torch.Tensor, store: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, max_n: int, *,
               block_n: int = 16, block_k: int = 64, num_warps: int = 4) -> torch.Tensor:
    """``[B, 2, max_n]`` float64 dots of q ``[B, 2, d]`` (float64) with the raw rows ``store[lo_b + j]``,
    j < n_b (0 for j >= n_b)."""
    B, two, d = q.shape
    _check(store, lo, n, B)
    if two != 2 or store.shape[1] != d:
        raise ValueError(f"q must be [B, 2, d] with d = {store.shape[1]}, got {tuple(q.shape)}")
    q = q.to(torch.float64).contiguous()
    out = torch.zeros((B, 2, max_n), dtype=torch.float64, device=q.device)
    grid = (B, triton.cdiv(max_n, block_n))
    _class_dots_kernel[grid](q, store, lo.to(torch.int64).contiguous(), n.to(torch.int64).contiguous(), out,
                             d, max_n, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out


def class_weighted_sum(p: torch.Tensor, store: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, *,
                       block_n: int = 16, block_k: int = 64, num_warps: int = 4) -> torch.Tensor:
    """``[B, d]`` float64: ``sum_{j < n_b} p[b, j] store[lo_b + j]`` for weights p ``[B, max_n]``."""
    B, max_n = p.shape
    _check(store, lo, n, B)
    d = store.shape[1]
    p = p.to(torch.float64).contiguous()
    out = torch.empty((B, d), dtype=torch.float64, device=p.device)
    grid = (B, triton.cdiv(d, block_k))
    _class_wsum_kernel[grid](p, store, lo.to(torch.int64).contiguous(), n.to(torch.int64).contiguous(), out,
                             d, max_n, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out
