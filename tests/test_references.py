"""Reference sources of SCT's target (sctlib.references): the whole data set on the device, the
class-balanced bank, the own image counted exactly once, and the statistics the trainer logs."""
import pytest
import torch

from sctlib.config import LossConfig
from sctlib.references import ClassBalancedBank, DatasetReferences, GatheredReferences, build_references


def brute(x_t, t, refs, own_index):
    """float64 softmax over refs [B, n, d] (per row), own image at column own_index: x0_hat, ESS, own weight."""
    x = x_t.double().reshape(x_t.shape[0], -1)
    d2 = ((x[:, None, :] - refs.double()) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * t.double()[:, None] ** 2), dim=1)
    return (w[:, :, None] * refs.double()).sum(1), 1 / (w**2).sum(1), w[:, own_index]


def grid_images(n, d, gen):
    """Images on EDM's uint8 grid u / 127.5 - 1 (what an EDM zip gives)."""
    return torch.randint(0, 256, (n, d), generator=gen).float() / 127.5 - 1.0


@pytest.mark.parametrize("compute", ["float64", "mixed"])
@pytest.mark.parametrize("conditional", [False, True])
def test_dataset_references_match_float64_softmax_with_the_own_image_once(conditional, compute):
    g = torch.Generator().manual_seed(0)
    N, d, B, C = 60, 12, 7, 3
    X = grid_images(N, d, g) * 0.1  # close images: many references share the weight at moderate t
    X = ((X + 1) * 127.5).round() / 127.5 - 1
    y = torch.arange(N) % C
    idx = torch.tensor([0, 5, 13, 22, 31, 47, 59])
    x0, lab = X[idx], y[idx]
    t = torch.tensor([0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 3.0])
    x_t = x0 + t[:, None] * torch.randn(B, d, generator=g)
    # tiny chunks so that every path streams over several chunks
    src = DatasetReferences(X, y if conditional else None, elements_per_chunk=4 * d, compute=compute, topk=3)
    assert src.is_uint8 and src.store.dtype == torch.uint8 and src.nbytes == N * d
    x0_hat, st = src(x_t, t, x0, lab if conditional else None, chunk_size=5)
    for i in range(B):
        mask = (y == lab[i]) if conditional else torch.ones(N, dtype=torch.bool)
        others = X[mask & (torch.arange(N) != idx[i])]
        refs = torch.cat([x0[i:i + 1], others])[None]  # own image first, exactly once
        exp, ess, own = brute(x_t[i:i + 1], t[i:i + 1], refs, 0)
        assert torch.allclose(x0_hat[i].double(), exp[0], atol=1e-6), i
        assert torch.allclose(st["ess"][i], ess[0], rtol=1e-6), i
        assert torch.allclose(st["own_weight"][i], own[0], rtol=1e-6, atol=1e-12), i
        assert int(st["n_refs"][i]) == refs.shape[1]
    assert float(st["ess"][0]) == pytest.approx(1.0, abs=1e-6)  # t = 0.01: one-hot on the own image
    assert float(st["ess"][-1]) > 3  # t = 3: the references share the weight


def test_dataset_references_float_store_and_subset_and_errors():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 2, generator=g)  # off the uint8 grid (2-D toys, digits): kept in float32
    src = DatasetReferences(X)
    assert not src.is_uint8 and src.store.dtype == torch.float32 and len(src) == 40
    sub = DatasetReferences(X, ref_size=10, seed=3)
    assert len(sub) == 10 and torch.equal(sub.store, DatasetReferences(X, ref_size=10, seed=3).store)
    # an own image that is not in the subset still counts exactly once (explicitly)
    x0 = X[:4]
    _, st = sub(x0 + 1e-3, torch.full((4,), 1e-3), x0)
    assert torch.allclose(st["own_weight"], torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="without labels"):
        src(x0, 1.0, x0, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        src(torch.zeros(2, 3), 1.0, torch.zeros(2, 3))


def test_class_balanced_bank_keeps_k_newest_per_class_with_aligned_labels():
    bank = ClassBalancedBank(num_classes=3, per_class=2)
    assert bank.tensors() == (None, None)
    x = torch.arange(5.0)[:, None]
    bank.push(x, torch.tensor([0, 0, 0, 1, 2]))  # three of class 0: the oldest one is dropped
    ref, lab = bank.tensors()
    got = {(int(l), float(r)) for r, l in zip(ref.reshape(-1), lab) if l >= 0}
    assert got == {(0, 1.0), (0, 2.0), (1, 3.0), (2, 4.0)} and int((lab == -1).sum()) == 2
    bank.push(torch.tensor([[9.0]]), torch.tensor([1]))
    ref, lab = bank.tensors()
    assert sorted(float(r) for r, l in zip(ref.reshape(-1), lab) if l == 1) == [3.0, 9.0]
    bank.push(torch.tensor([[7.0]]), torch.tensor([1]))  # FIFO within the class: 3 leaves
    ref, lab = bank.tensors()
    assert sorted(float(r) for r, l in zip(ref.reshape(-1), lab) if l == 1) == [7.0, 9.0]
    other = ClassBalancedBank(3, 2)
    other.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.tensors(), bank.tensors()))
    with pytest.raises(ValueError, match="mismatch"):
        ClassBalancedBank(3, 4).load_state_dict(bank.state_dict())


def test_gathered_sources_report_own_weight_and_no_other_reference():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    t = torch.full((6,), 2.0)
    x_t = x0 + t[:, None] * torch.randn(6, 5, generator=g)
    _, st = GatheredReferences("batch")(x_t, t, x0, labels)
    assert st["n_refs"].tolist() == [2, 2, 1, 3, 3, 3]  # class 1 has only its own image
    assert float(st["own_weight"][2]) == 1.0 and float(st["ess"][2]) == pytest.approx(1.0)
    for i in (0, 3):
        mask = labels == labels[i]
        refs = x0[mask][None]
        _, ess, own = brute(x_t[i:i + 1], t[i:i + 1], refs, int((torch.nonzero(mask)[:, 0] == i).nonzero()))
        assert torch.allclose(st["own_weight"][i].double(), own[0], rtol=1e-5)
        assert torch.allclose(st["ess"][i].double(), ess[0], rtol=1e-5)
    # the class-balanced bank: references of earlier batches, per class
    src = build_references(LossConfig(task="sct", ref_source="bank", ref_per_class=4), num_classes=3)
    src(x_t, t, x0, labels)
    _, st = src(x_t, t, x0, labels)  # the second call sees the first batch in the bank
    assert st["n_refs"].tolist() == [4, 4, 2, 6, 6, 6]
    state = src.state_dict()
    assert "class_bank" in state
    with pytest.raises(ValueError, match="labels"):
        src(x_t, t, x0, None)


def test_build_references_errors():
    with pytest.raises(ValueError, match="training set"):
        build_references(LossConfig(task="sct", ref_source="dataset"))
    with pytest.raises(ValueError, match="ref_per_class"):
        build_references(LossConfig(task="sct", ref_source="batch", ref_per_class=3))
    with pytest.raises(ValueError, match="label_dim"):
        build_references(LossConfig(task="sct", ref_source="bank", ref_per_class=3))
    with pytest.raises(ValueError, match="ref_source"):
        build_references(LossConfig(task="sct", ref_source="pool"))
    X, y = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
    src = build_references(LossConfig(task="sct", ref_source="dataset"), dataset=(X, y), num_classes=2)
    assert src.offsets.tolist() == [0, 2, 4]
    src = build_references(LossConfig(task="sct", ref_source="dataset"), dataset=(X, y), num_classes=0)
    assert src.offsets is None  # unconditional model: the whole set


def test_dataset_references_from_an_edm_zip(tmp_path):
    from sctlib.data import EDMZipDataset, write_edm_zip
    from sctlib.references import dataset_tensors

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (10, 3, 4, 4), generator=g, dtype=torch.uint8)
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 2]
    path = write_edm_zip(tmp_path / "d.zip", images, labels)
    ds = EDMZipDataset(path, cond=True, xflip=True)
    X, y = dataset_tensors(ds)
    assert X.dtype == torch.uint8 and torch.equal(X, images) and y.tolist() == labels  # no flipped copies
    assert len(ds) == 20 and torch.equal(ds.image_uint8(13), images[3].flip(-1))  # the training set is untouched
    src = build_references(LossConfig(task="sct", ref_source="dataset"), dataset=ds, num_classes=3)
    assert src.is_uint8 and src.offsets.tolist() == [0, 3, 6, 10] and src.max_class == 4
    x0 = images[:2].float() / 127.5 - 1
    _, st = src(x0 + 0.01, 1e-2, x0, torch.tensor([0, 1]))
    assert st["n_refs"].tolist() == [3, 3]  # the class, with the own image counted once


# ------------------------------------------------------------------------------------------------
# compute='mixed' (float32 screening + exact float64 top-k) against compute='float64' (issue 13).

def smooth_with_near_duplicates(seed=0, n=240, shape=(3, 16, 16)):
    """uint8 images that look like images (smooth: bilinear upsampling of 4x4 noise) plus near-duplicates:
    copies one uint8 level apart in ~2% of the pixels (beyond the dup_rms used below, so they are real
    references at small t), copies one level apart everywhere, and exact copies (skipped as the own image)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, shape[0], 4, 4, generator=g)
    img = torch.nn.functional.interpolate(z, size=shape[1:], mode="bilinear", align_corners=False)
    U = ((img.tanh() * 0.9 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def near(V, frac):
        D = V.reshape(V.shape[0], -1).int()
        step = (torch.rand(D.shape, generator=g) < frac) * torch.randint(0, 2, D.shape, generator=g).mul(2).sub(1)
        return (D + step).clamp(0, 255).to(torch.uint8).reshape(V.shape)

    U = torch.cat([U, near(U[:40], 0.02), near(U[:40], 0.02), near(U[40:60], 1.0), U[60:70]])
    return U, g


T_GRID = [0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("conditional", [False, True])
def test_mixed_matches_float64_across_t_with_near_duplicates(conditional, split):
    U, g = smooth_with_near_duplicates()
    N = U.shape[0]
    X = U.float() / 127.5 - 1
    y = torch.arange(N) % 3
    # dup_rms 5e-4: a copy one level apart in 2% of the pixels (||.||^2 ~ 1e-3) is a reference of its own;
    # the logits then mix own image and near-copy at t ~ 0.02, where float32 screening is off by ~1 nat.
    src = DatasetReferences(U, y if conditional else None, dup_rms=5e-4, elements_per_chunk=64 * 768, split_tf32=split,
                            compute="mixed")
    idx = torch.cat([torch.arange(0, 70, 3), torch.randint(0, N, (8,), generator=g)])
    B = idx.shape[0]
    x0, lab = X[idx], (y[idx] if conditional else None)
    for t in T_GRID:
        x_t = x0 + t * torch.randn(x0.shape, generator=g)
        tt = torch.full((B,), t)
        ref, st_ref = src(x_t, tt, x0, lab, compute="float64", return_weights=True)
        mix, st_mix = src(x_t, tt, x0, lab, compute="mixed", return_weights=True)
        num = (mix.double() - ref.double()).reshape(B, -1).norm(dim=1)
        den = (x_t.double() - ref.double()).reshape(B, -1).norm(dim=1)
        assert float((num / den).max()) <= 1e-3, t
        assert float((st_mix["weights"] - st_ref["weights"]).abs().max()) <= 1e-4, t
        assert float((st_mix["own_weight"] - st_ref["own_weight"]).abs().max()) <= 1e-4, t
        assert torch.allclose(st_mix["ess"], st_ref["ess"], rtol=1e-3), t
        assert torch.equal(st_mix["n_refs"], st_ref["n_refs"]), t


@pytest.mark.parametrize("compute", ["float64", "mixed"])
@pytest.mark.parametrize("conditional", [False, True])
def test_own_image_counts_exactly_once_with_stored_copies(conditional, compute):
    U, g = smooth_with_near_duplicates(seed=1, n=80)
    U = torch.cat([U, U[:5], U[:5]])  # the first five images stored three times each
    X = U.float() / 127.5 - 1
    y = torch.arange(U.shape[0]) % 2 if conditional else None
    src = DatasetReferences(U, y, compute=compute)
    x0 = X[:5]
    lab = y[:5] if conditional else None
    x0_hat, st = src(x0 + 1e-3 * torch.randn(x0.shape, generator=g), torch.full((5,), 1e-3), x0, lab)
    assert torch.equal(st["own_weight"], torch.ones(5, dtype=torch.float64))  # not 1/3: copies skipped
    assert torch.allclose(x0_hat, x0, atol=1e-6)
    # at a large t the softmax over (own once + the other stored images) matches a brute-force float64 one
    t = torch.full((5,), 3.0)
    x_t = x0 + t[:, None, None, None] * torch.randn(x0.shape, generator=g)
    x0_hat, st = src(x_t, t, x0, lab)
    for i in range(5):
        keep = ((X - x0[i]) ** 2).reshape(X.shape[0], -1).sum(1) > src.dup_d2  # copies within dup_rms: skipped
        if conditional:
            keep &= y == y[i]
        refs = torch.cat([x0[i:i + 1], X[keep]]).reshape(1, -1, X[0].numel())
        exp, ess, own = brute(x_t[i:i + 1].reshape(1, -1), t[i:i + 1], refs, 0)
        assert torch.allclose(x0_hat[i].double().reshape(-1), exp[0], atol=1e-5), i
        assert float(st["own_weight"][i]) == pytest.approx(float(own[0]), rel=1e-4), i
        assert int(st["n_refs"][i]) == refs.shape[1], i


@pytest.mark.parametrize("flag", [True, False])
def test_mixed_turns_tf32_off_inside_and_restores_the_global_flags(flag):
    seen = {}

    class Probe(DatasetReferences):
        def _mixed(self, *a, **k):
            seen["tf32"] = torch.backends.cuda.matmul.allow_tf32
            return super()._mixed(*a, **k)

    U, g = smooth_with_near_duplicates(seed=2, n=80)
    X = U.float() / 127.5 - 1
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = flag
        Probe(U, split_tf32=True, compute="mixed")(X[:3] + 0.1, 0.1, X[:3])
        assert seen == {"tf32": False}
        assert torch.backends.cuda.matmul.allow_tf32 == flag
        torch.get_float32_matmul_precision()  # the switches stay consistent (no legacy / new API mix)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_ref_compute_config_field_reaches_the_source():
    from sctlib import config as C

    X, y = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
    assert LossConfig().ref_compute == "float64"
    src = build_references(LossConfig(task="sct", ref_source="dataset", ref_compute="float64"), dataset=(X, y))
    assert src.compute == "float64"
    assert build_references(LossConfig(task="sct", ref_source="dataset"), dataset=(X, y)).compute == "float64"
    assert build_references(LossConfig(task="sct", ref_source="dataset", ref_compute="mixed"), dataset=(X, y)).compute == "mixed"
    cfg = C.get_preset("cifar10-sct")
    with pytest.raises(C.ConfigError, match="ref_compute"):
        C.validate(C.override(cfg, **{"loss.ref_compute": "fp16"}))
    with pytest.raises(ValueError, match="compute"):
        DatasetReferences(X, compute="fp16")


def _tf32_truncate(x):
    return (x.contiguous().to(torch.float32).view(torch.int32) & -(1 << 13)).view(torch.float32)


def test_split_tf32_pieces_are_exact_in_tf32_and_sum_to_the_input():
    from sctlib.references import split_tf32

    g = torch.Generator().manual_seed(4)
    q = torch.randn(6, 500, generator=g) * torch.logspace(-4, 2, 500)
    p = split_tf32(q).reshape(3, 6, 500)
    assert torch.equal(p[0] + p[1] + p[2], q)
    assert torch.equal(_tf32_truncate(p), p)  # nothing for a TF32 tensor core to drop
    U = torch.randint(0, 256, (40, 500), generator=g).float()
    exact = q.double() @ U.double().T
    via_pieces = sum(_tf32_truncate(p[i]).double() @ U.double().T for i in range(3))
    plain = _tf32_truncate(q).double() @ U.double().T
    scale = q.abs().double() @ U.double().T
    assert float(((via_pieces - exact).abs() / scale).max()) < 1e-12
    assert float(((plain - exact).abs() / scale).max()) > 1e-5  # unsplit TF32: ~2^-11 per input


@pytest.mark.parametrize("conditional", [False, True])
def test_mixed_under_emulated_tf32_tensor_cores(conditional, monkeypatch):
    """The training step runs with TF32 on. With the matmuls replaced by an emulation of TF32 tensor cores
    (inputs truncated to 10 mantissa bits while the flag is on), 'mixed' with the TF32 split still
    matches 'float64': the split pieces are exact, and the per-class path turns TF32 off."""
    import sctlib.references as refs

    def tf32_matmul(a, b):
        if torch.backends.cuda.matmul.allow_tf32:
            a, b = _tf32_truncate(a), _tf32_truncate(b)
        return torch.matmul(a, b)

    monkeypatch.setattr(refs, "_mm", tf32_matmul)
    U, g = smooth_with_near_duplicates(seed=5)
    N = U.shape[0]
    X = U.float() / 127.5 - 1
    y = torch.arange(N) % 3
    src = DatasetReferences(U, y if conditional else None, dup_rms=5e-4, split_tf32=True, compute="mixed",
                            elements_per_chunk=64 * 768)
    idx = torch.cat([torch.arange(0, 70, 3), torch.randint(0, N, (8,), generator=g)])
    B = idx.shape[0]
    x0, lab = X[idx], (y[idx] if conditional else None)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for t in T_GRID:
            x_t = x0 + t * torch.randn(x0.shape, generator=g)
            tt = torch.full((B,), t)
            ref, st_ref = src(x_t, tt, x0, lab, compute="float64", return_weights=True)
            mix, st_mix = src(x_t, tt, x0, lab, compute="mixed", return_weights=True)
            assert torch.backends.cuda.matmul.allow_tf32  # the caller's flag survives
            num = (mix.double() - ref.double()).reshape(B, -1).norm(dim=1)
            den = (x_t.double() - ref.double()).reshape(B, -1).norm(dim=1)
            assert float((num / den).max()) <= 1e-3, t
            assert float((st_mix["weights"] - st_ref["weights"]).abs().max()) <= 1e-4, t
            assert torch.equal(st_mix["n_refs"], st_ref["n_refs"]), t
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_mixed_float_store_never_splits_for_tf32(monkeypatch):
    """A float32 store (off the uint8 grid) is not exact in TF32, so 'mixed' keeps plain float32 GEMMs
    (TF32 off) for it even when the split is asked for."""
    import sctlib.references as refs

    def tf32_matmul(a, b):
        if torch.backends.cuda.matmul.allow_tf32:
            a, b = _tf32_truncate(a), _tf32_truncate(b)
        return torch.matmul(a, b)

    monkeypatch.setattr(refs, "_mm", tf32_matmul)
    g = torch.Generator().manual_seed(6)
    X = torch.randn(300, 8, generator=g) * 0.3
    src = DatasetReferences(X, split_tf32=True, compute="mixed")
    assert not src.is_uint8
    x0 = X[:10]
    for t in (0.05, 0.3, 1.0, 5.0):
        x_t = x0 + t * torch.randn(x0.shape, generator=g)
        ref, sr = src(x_t, t, x0, compute="float64", return_weights=True)
        mix, sm = src(x_t, t, x0, compute="mixed", return_weights=True)
        num = (mix.double() - ref.double()).norm(dim=1)
        den = (x_t.double() - ref.double()).norm(dim=1)
        assert float((num / den).max()) <= 1e-3, t
        assert float((sm["weights"] - sr["weights"]).abs().max()) <= 1e-4, t


_FUSED_CHECK = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from sctlib.references import DatasetReferences
from sctlib import _triton_refs
assert _triton_refs.AVAILABLE
g = torch.Generator().manual_seed(3)
d, C = 150, 4                               # 150 = 2 x 64 + 22: several K blocks of the kernels, the last partial
sizes = [9, 23, 2, 14]                     # unequal classes: windows padded to the largest (23 > one 16-row block)
y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
N = len(y)
u = torch.randint(100, 156, (N, d), generator=g)
u[5] = u[4]                                 # a stored duplicate of an image (counted once as the own image)
u[30] = torch.clamp(u[29] + 1, max=255)     # and a near-duplicate, one uint8 level apart
results = []
for store_kind in ("uint8", "float"):
    X = u.float() / 127.5 - 1 if store_kind == "uint8" else u.float() / 300.0
    rows = torch.tensor([4, 0, 29, 32, 45, 10])
    x0, lab = X[rows].double(), y[rows]         # float64 queries: x0_hat comes back in float64, so the
    t = torch.tensor([0.01, 0.08, 0.2, 0.5, 2.0, 10.0], dtype=torch.float64)  # 1e-9 bound is not float32 rounding
    x_t = x0 + t[:, None] * torch.randn(len(rows), d, generator=g, dtype=torch.float64)
    out = {}
    for fused in (False, True):
        src = DatasetReferences(X, y, elements_per_chunk=3 * d * len(rows), fused=fused)
        assert src.is_uint8 == (store_kind == "uint8")
        out[fused] = src(x_t, t, x0, lab, return_weights=True)
    (a, sa), (b, sb) = out[False], out[True]
    err = [float((a.double() - b.double()).abs().max())]
    for k in ("ess", "own_weight", "n_refs", "weights"):
        err.append(float((sa[k] - sb[k]).abs().max()))
    results.append((store_kind, err, [int(v) for v in sb["n_refs"]], str(b.dtype)))
# benchmarks/reference_cost.py's GPU-only accuracy check, run here through the interpreter: float64 queries
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from reference_cost import fused_vs_torch_rel
src = DatasetReferences(X, y, fused=None)
rel = fused_vs_torch_rel(src, x_t.float(), t.float(), x0.float(), lab, None)
assert src.fused is None                    # restored
_ws = _triton_refs.class_weighted_sum       # and it sees a 1e-4 error planted in the fused path only
_triton_refs.class_weighted_sum = lambda *a, **k: _ws(*a, **k) * (1 + 1e-4)
planted = fused_vs_torch_rel(src, x_t.float(), t.float(), x0.float(), lab, None)
_triton_refs.class_weighted_sum = _ws
results.append(("benchmark", [rel, planted], [], "torch.float64"))
print(repr(results))
'''


@pytest.mark.skipif(not __import__("sctlib._triton_refs", fromlist=["AVAILABLE"]).AVAILABLE,
                    reason="Triton is not installed (it ships with PyTorch's CUDA builds)")
def test_fused_class_kernels_equal_the_pytorch_float64_path_under_the_triton_interpreter():
    """The GPU path of the class-restricted float64 pass (sctlib._triton_refs), run by Triton's CPU interpreter
    against the PyTorch path: same x0_hat, ESS, own weight, reference counts and weights, on a uint8 and a
    float32 store with unequal classes, a stored duplicate and a near-duplicate of an own image."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _FUSED_CHECK, str(root)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert [r[0] for r in results] == ["uint8", "float", "benchmark"]
    assert results[2][1][0] < 1e-9 < 1e-7 < results[2][1][1]  # reference_cost.fused_vs_torch_rel: agrees; sees the plant
    results = results[:2]
    # Reference counts, own image once: row 4 (class 0 of 9) loses its stored self and its copy 5 -> 8; row 29
    # (class 1 of 23) keeps its near-copy 30 on the uint8 grid (RMS 1/127.5 > dup_rms 0.005) but not on the
    # float store, where the same step is 1/300 < 0.005 -> 23 / 22; row 32 is in the class of 2.
    expected = {"uint8": [8, 9, 23, 2, 14, 23], "float": [8, 9, 22, 2, 14, 23]}
    for kind, errs, n_refs, dtype in results:
        assert dtype == "torch.float64" and max(errs) < 1e-9, (kind, errs, dtype)
        assert n_refs == expected[kind], (kind, n_refs)


def test_fused_path_is_chosen_on_cuda_only_and_refuses_without_triton(monkeypatch):
    from sctlib import _triton_refs

    src = DatasetReferences(torch.zeros(4, 3), torch.tensor([0, 0, 1, 1]))
    assert src._use_fused(torch.device("cpu")) is False
    assert src._use_fused(torch.device("cuda")) is _triton_refs.AVAILABLE
    monkeypatch.setattr(_triton_refs, "AVAILABLE", False)
    assert src._use_fused(torch.device("cuda")) is False
    forced = DatasetReferences(torch.zeros(4, 3), torch.tensor([0, 0, 1, 1]), fused=True)
    with pytest.raises(RuntimeError, match="needs Triton"):
        forced._use_fused(torch.device("cpu"))


def test_a_failing_fused_kernel_warns_and_falls_back_to_the_pytorch_path(monkeypatch):
    from sctlib import _triton_refs

    g = torch.Generator().manual_seed(1)
    X, y = grid_images(20, 6, g), torch.arange(20) % 2
    x0, lab, t = X[:4], y[:4], torch.full((4,), 0.3)
    x_t = x0 + 0.3 * torch.randn(4, 6, generator=g)
    expected, _ = DatasetReferences(X, y, fused=False)(x_t, t, x0, lab)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(_triton_refs, "class_dots", broken)
    monkeypatch.setattr(_triton_refs, "AVAILABLE", True)
    src = DatasetReferences(X, y)                       # fused=None: the kernels are tried ...
    monkeypatch.setattr(src, "_use_fused", lambda dev: src.fused is not False)
    with pytest.warns(RuntimeWarning, match="fused reference kernels failed"):
        got, _ = src(x_t, t, x0, lab)
    assert torch.equal(got, expected) and src.fused is False   # ... and dropped after the failure
    forced = DatasetReferences(X, y, fused=True)        # fused=True: the error surfaces
    with pytest.raises(RuntimeError, match="no kernel here"):
        forced(x_t, t, x0, lab)


def test_out_of_memory_in_the_fused_pass_is_not_mistaken_for_a_kernel_that_failed_to_build(monkeypatch):
    from sctlib import _triton_refs

    g = torch.Generator().manual_seed(1)
    X, y = grid_images(20, 6, g), torch.arange(20) % 2
    x0, lab, t = X[:4], y[:4], torch.full((4,), 0.3)
    x_t = x0 + 0.3 * torch.randn(4, 6, generator=g)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(_triton_refs, "AVAILABLE", True)
    src = DatasetReferences(X, y)                       # fused=None: a build failure would fall back ...
    monkeypatch.setattr(src, "_use_fused", lambda dev: src.fused is not False)
    monkeypatch.setattr(src, "_class_pass_fused", oom)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        src(x_t, t, x0, lab)
    assert src.fused is None                            # ... but memory is the caller's to see: no fallback


@pytest.mark.skipif(not __import__("sctlib._triton_refs", fromlist=["AVAILABLE"]).AVAILABLE,
                    reason="Triton is not installed (it ships with PyTorch's CUDA builds)")
def test_fused_kernels_compile_for_hopper_without_spilling():
    """The kernels as the GPU will build them (Triton's compiler down to a cubin for sm_90, no GPU needed), at
    the wrappers' default tiles: they compile, and ptxas reports no register spills (a spilling float64 tile
    would make the pass slow, not wrong, so the interpreter test cannot see it). Compiled without the
    divisibility-by-16 specialisation of pointer and size arguments that a launch may add, which changes
    vectorisation, not the register tiles checked here; the GPU timing (benchmarks/reference_cost.py) covers
    the launched build."""
    import inspect
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sctlib import _triton_refs as K

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton build ships no ptxas")
    for fn, wrapper, first in ((K._class_dots_kernel, K.class_dots, "q_ptr"),
                               (K._class_wsum_kernel, K.class_weighted_sum, "p_ptr")):
        defaults = {k: v.default for k, v in inspect.signature(wrapper).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        sig = {first: "*fp64", "store_ptr": "*u8", "lo_ptr": "*i64", "n_ptr": "*i64", "out_ptr": "*fp64",
               "d": "i32", "max_n": "i32", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        src = ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_N": defaults["block_n"], "BLOCK_K": defaults["block_k"]})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": defaults["num_warps"]})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as fh:
                fh.write(kernel.asm["ptx"])
            res = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "0 bytes spill stores" in res.stderr, res.stderr
