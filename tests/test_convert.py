"""Reading EDM / EDM2 / ECT snapshots without executing them.

The snapshots are written here in the documented persistence structure (ect-edm-code-facts.md Sec. 3.3):
every network object is pickled as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
meta = {type: 'class', version: 6, module_src, class_name, state: obj.__dict__}. ``module_src`` writes a
marker file and raises if anyone executes it; every test checks the marker was never created.
"""
import collections
import copy
import os
import pickle
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sctlib.checkpoints import load_model
from sctlib.config import to_dict
from sctlib.convert import ConvertError, UnsafePickleError, load_edm_pickle, state_dict_from_pickle
from sctlib.networks import NET_PRESETS, build_network
from sctlib.networks.ddpmpp import DDPMpp, Linear
from sctlib.networks.edm2 import EDM2UNet, MPConv, MPFourier
from sctlib.precond import Precond

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ writers

@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # nothing here trains; skipping autograd keeps the forwards cheap
        yield


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """Fake ``torch_utils.persistence`` / ``dnnlib.util`` modules so pickle can name their globals."""
    tu, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dn, du = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):  # the writer only refers to it by name
        raise AssertionError("the reader must never call the real reconstructor")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj
    tu.persistence = pers

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    du.EasyDict = EasyDict
    dn.util = du
    for name, mod in [("torch_utils", tu), ("torch_utils.persistence", pers), ("dnnlib", dn), ("dnnlib.util", du)]:
        monkeypatch.setitem(sys.modules, name, mod)
    marker = tmp_path / "EXECUTED"
    src = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"
           "raise RuntimeError('module_src must never run')\n")
    ns = types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict, marker=marker,
                               module_src=src)
    yield ns
    assert not marker.exists(), "embedded module source was executed"


class FakeLoss:
    """ECT's ECMLoss keeps a bound method (self.t_to_r = self.t_to_r_sigmoid): pickled via builtins.getattr."""

    def __init__(self):
        self.q, self.k, self.b = 2.0, 8.0, 1.0
        self.t_to_r = self.t_to_r_sigmoid

    def t_to_r_sigmoid(self, t):
        return t


def make_pickler(fakes, top, top_name, init_kwargs, inject=None):
    """A Pickler class that writes our modules the way persistence does, under EDM's class names."""
    names = {DDPMpp: "SongUNet", EDM2UNet: "UNet"}

    class SnapshotPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, FakeLoss):
                class_name, state = "ECMLoss", obj.__dict__  # not copied: the bound method refers back to it
            elif isinstance(obj, nn.Module) and not isinstance(obj, (nn.ModuleDict, nn.ModuleList)):
                class_name = top_name if obj is top else names.get(type(obj), type(obj).__name__)
                state = dict(obj.__dict__)
                if "skip_scale" in state:  # EDM stores np.sqrt(0.5): numpy scalars appear in real pickles
                    state["skip_scale"] = np.float64(state["skip_scale"])
                if obj is top:
                    state["_init_args"], state["_init_kwargs"] = (), copy.deepcopy(init_kwargs)
                if inject and type(obj) in (DDPMpp,):
                    mods = collections.OrderedDict()
                    for k, v in state["_modules"].items():
                        if k in inject:  # insert the extra modules *before* key k
                            mods.update(inject[k])
                        mods[k] = v
                    state["_modules"] = mods
            else:
                return NotImplemented
            meta = dict(type="class", version=6, module_src=fakes.module_src, class_name=class_name, state=state)
            return fakes.reconstruct, (meta,)

    return SnapshotPickler


def write_pkl(path, fakes, data, top, top_name, init_kwargs, inject=None):
    with open(path, "wb") as f:
        make_pickler(fakes, top, top_name, init_kwargs, inject)(f, protocol=4).dump(data)  # EDM: pickle.dump
    return path


def write_pt(path, fakes, data, top, top_name, init_kwargs):
    mod = types.SimpleNamespace(Pickler=make_pickler(fakes, top, top_name, init_kwargs), __name__="pickle")
    torch.save(data, path, pickle_module=mod)  # ECT: torch.save(dict(net=..., ...)), protocol 2
    return path


def _perturbed(cfg, seed=0):
    torch.manual_seed(seed)
    net = build_network(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p)) if p.ndim else p.fill_(0.7)
    return net


def _plain(net, cfg):
    """Reference denoiser: the same weights with the plain EDM coefficients, eval mode."""
    ref = build_network(replace(cfg, boundary="never")).eval()
    ref.load_state_dict(net.state_dict())
    return ref


def _inputs(cfg, B=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, generator=g)
    sigma = torch.tensor([0.02, 0.821, 30.0])[:B]
    labels = torch.arange(B) % cfg.label_dim if cfg.label_dim else None
    return x, sigma, labels


DDPMPP_KW = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                 decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], use_fp16=False)


def _edm_snapshot(fakes, tmp_path):
    cfg = NET_PRESETS["ddpmpp-tiny"]
    net = _perturbed(cfg)
    kw = dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2],
              dropout=0.13, augment_dim=9, **DDPMPP_KW)
    aug = Linear(9, cfg.model_channels, bias=False)  # EDM's uncond pkl: model.map_augment.weight [C, 9]
    data = dict(ema=net, loss_fn=FakeLoss(), augment_pipe=None, dataset_kwargs=dict(path="cifar10.zip", xflip=False))
    path = write_pkl(tmp_path / "network-snapshot-edm.pkl", fakes, data, net, "EDMPrecond", kw,
                     inject={"map_layer0": {"map_augment": aug}})
    return path, net, cfg


# ------------------------------------------------------------------------------------------------ tests

def test_edm_ddpmpp_snapshot(fakes, tmp_path):
    path, net, cfg = _edm_snapshot(fakes, tmp_path)
    model, info = load_edm_pickle(path)
    assert not model.training and model.boundary == "never" and model.inner_name == "model"
    assert info["source"] == "edm" and info["class_name"] == "EDMPrecond" and info["inner_class"] == "SongUNet"
    assert info["dropped_keys"] == ["model.map_augment.weight"]
    expect = to_dict(replace(cfg, dropout=0.13, boundary="never"))
    assert info["net_config"] == expect
    assert info["init_kwargs"]["augment_dim"] == 9
    x, sigma, labels = _inputs(cfg)
    assert torch.equal(model(x, sigma), _plain(net, cfg).eval()(x, sigma))


def test_state_dict_order_and_extra_keys(fakes, tmp_path):
    path, net, cfg = _edm_snapshot(fakes, tmp_path)
    sd, info = state_dict_from_pickle(path)
    ours = list(net.state_dict())
    i = ours.index("model.map_layer0.weight")
    assert list(sd) == ours[:i] + ["model.map_augment.weight"] + ours[i:]  # EDM's registration order
    assert info["extra_keys"] == ["model.map_augment.weight"] and tuple(sd["model.map_augment.weight"].shape) == (16, 9)
    for k, v in net.state_dict().items():
        assert torch.equal(sd[k], v)


def test_ect_cifar_snapshot_boundary_and_labels(fakes, tmp_path):
    cfg = replace(NET_PRESETS["ddpmpp-tiny"], label_dim=10, dropout=0.2, sigma_min=0.003, boundary="eval")
    net = _perturbed(cfg, seed=3)
    kw = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
              dropout=0.2, sigma_min=0.003, sigma_max=float("inf"), **DDPMPP_KW)
    path = write_pkl(tmp_path / "ect.pkl", fakes, dict(ema=net.eval(), loss_fn=FakeLoss(), augment_pipe=None,
                                                       dataset_kwargs={}), net, "ECMPrecond", kw)
    model, info = load_edm_pickle(path)
    assert info["source"] == "ect" and info["source_boundary"] == "eval" and info["source_sigma_min"] == 0.003
    assert info["net_config"]["label_dim"] == 10 and info["net_config"]["dropout"] == 0.2
    assert info["net_config"]["boundary"] == "never" and info["dropped_keys"] == []
    x, sigma, labels = _inputs(cfg)
    # ECMPrecond in its training form (plain EDM coefficients) with dropout off
    assert torch.equal(model(x, sigma, labels), _plain(net, cfg)(x, sigma, labels))
    assert not torch.allclose(model(x, sigma, labels), net.eval()(x, sigma, labels))  # boundary form differs


class _EDM2Precond(nn.Module):
    """EDM2's Precond layout: unet, then the log-variance head ECT deletes."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.logvar_fourier = MPFourier(128)
        self.logvar_linear = MPConv(128, 1)


def test_edm2_fp16_snapshot(fakes, tmp_path):
    cfg = NET_PRESETS["edm2-tiny"]
    net = _perturbed(cfg, seed=5)
    top = _EDM2Precond(copy.deepcopy(net.unet)).half().eval()  # EDM2 stores the EMA in float16
    kw = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[8], use_fp16=True, sigma_data=0.5, logvar_channels=128, dropout=0.1)
    data = fakes.EasyDict(encoder=None, dataset_kwargs=dict(path="img64.zip"), loss_fn=None, ema=top)
    path = write_pkl(tmp_path / "edm2.pkl", fakes, data, top, "Precond", kw)
    model, info = load_edm_pickle(path)
    assert info["source"] == "edm2" and info["dtypes"] == ["float16"] and info["inner_class"] == "UNet"
    assert info["dropped_keys"] == ["logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight"]
    assert info["net_config"] == to_dict(replace(cfg, dropout_res=0))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = build_network(cfg).eval()
    ref.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    x, sigma, labels = _inputs(cfg)
    assert torch.equal(model(x, sigma, labels), ref(x, sigma, labels))
    # the fp16 rounding is real: the fp32 original differs a little
    diff = (model(x, sigma, labels) - net.eval()(x, sigma, labels)).abs().max()
    assert 0 < diff < 0.05


def test_ect_training_state_pt(fakes, tmp_path):
    cfg = NET_PRESETS["edm2-tiny"]
    net = _perturbed(cfg, seed=7).train()  # ECT saves the live training module
    emas = [_perturbed(cfg, seed=10 + i).state_dict() for i in range(3)]
    online = _perturbed(cfg, seed=20).state_dict()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    kw = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[8], dropout=0.1, dropout_res=8)
    data = dict(net=net, optimizer_state=opt.state_dict(),
                ema_state={"stds": [0.010, 0.050, 0.100], "emas": emas}, online_ema_state=online)
    path = write_pt(tmp_path / "training-state-000100.pt", fakes, data, net, "Precond", kw)
    x, sigma, labels = _inputs(cfg)

    model, info = load_edm_pickle(path)
    assert info["container"] == "torch-zip" and info["which"] == "net" and info["source"] == "ect-edm2"
    assert info["available"] == ["net", "ema_0", "ema_1", "ema_2", "online_ema"]
    assert info["phema_stds"] == [0.010, 0.050, 0.100] and info["net_config"]["dropout_res"] == 8
    assert torch.equal(model(x, sigma, labels), _plain(net, cfg)(x, sigma, labels))
    for which, sd in [("ema_1", emas[1]), ("online_ema", online)]:
        m, inf = load_edm_pickle(path, which=which)
        ref = build_network(cfg).eval()
        ref.load_state_dict(sd)
        assert inf["which"] == which and torch.equal(m(x, sigma, labels), ref(x, sigma, labels))
    with pytest.raises(ValueError, match="available: net, ema_0"):
        load_edm_pickle(path, which="ema_7")


def test_cli_writes_inert_format(fakes, tmp_path):
    path, net, cfg = _edm_snapshot(fakes, tmp_path)
    out = tmp_path / "converted"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "sctlib.convert", str(path), str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ddpmpp" in r.stdout and "model.map_augment.weight" in r.stdout
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    model, info = load_model(out / "model")
    assert info["meta"]["source"] == "edm" and len(info["meta"]["source_sha256"]) == 64
    x, sigma, _ = _inputs(cfg)
    assert torch.equal(model(x, sigma), _plain(net, cfg)(x, sigma))
    r = subprocess.run([sys.executable, "-m", "sctlib.convert", str(tmp_path / "nope.pkl"), str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not found" in r.stderr


# ------------------------------------------------------------------------------------------------ bad input

class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "eval", "nested"])
def test_malicious_pickle_is_refused_and_nothing_runs(fakes, tmp_path, kind):
    victim = tmp_path / "PWNED"
    if kind == "os.system":
        payload, needle = dict(ema=_Evil(os.system, f"touch {victim}")), "system"
    elif kind == "eval":
        payload, needle = dict(ema=_Evil(eval, f"open({str(victim)!r}, 'w').write('x')")), "eval"
    else:  # hidden inside a persistence record's state, after valid tensors
        net = build_network("mlp-toy")
        net.hidden_payload = _Evil(os.system, f"touch {victim}")
        payload, needle = dict(ema=net), "system"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        make_pickler(fakes, None, "EDMPrecond", {})(f, protocol=4).dump(payload)
    with pytest.raises(UnsafePickleError, match=needle) as e:
        load_edm_pickle(path)
    assert "nothing from the file was executed" in str(e.value)
    assert not victim.exists()


def test_malicious_training_state_pt_is_refused(fakes, tmp_path):
    victim = tmp_path / "PWNED"
    torch.save({"net": _Evil(os.system, f"touch {victim}"), "optimizer_state": {}}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match="system"):
        load_edm_pickle(tmp_path / "evil.pt")
    assert not victim.exists()


def test_unknown_class_is_named(fakes, tmp_path, monkeypatch):
    mod = types.ModuleType("training.networks")

    class Mystery:
        pass

    Mystery.__module__, Mystery.__qualname__ = "training.networks", "Mystery"
    mod.Mystery = Mystery
    monkeypatch.setitem(sys.modules, "training", types.ModuleType("training"))
    monkeypatch.setitem(sys.modules, "training.networks", mod)
    path = tmp_path / "mystery.pkl"
    path.write_bytes(pickle.dumps(dict(ema=Mystery()), protocol=4))
    with pytest.raises(UnsafePickleError, match="training.networks.Mystery"):
        load_edm_pickle(path)


def test_truncated_files(fakes, tmp_path):
    path, net, cfg = _edm_snapshot(fakes, tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="truncated"):
        load_edm_pickle(cut)
    pt = write_pt(tmp_path / "state.pt", fakes, dict(net=net), net, "ECMPrecond", DDPMPP_KW)
    blob = pt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConvertError, match="truncated"):
        load_edm_pickle(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError):
        load_edm_pickle(tmp_path / "missing.pkl")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(ConvertError):
        load_edm_pickle(tmp_path / "empty.pkl")


def test_shape_mismatch_and_unsupported_settings(fakes, tmp_path):
    cfg = NET_PRESETS["ddpmpp-tiny"]
    net = _perturbed(cfg)
    net.inner.map_layer1.weight = nn.Parameter(torch.zeros(5, 5))
    kw = dict(img_resolution=16, img_channels=3, label_dim=0, **DDPMPP_KW)
    path = write_pkl(tmp_path / "bad.pkl", fakes, dict(ema=net), net, "EDMPrecond", kw)
    with pytest.raises(ConvertError, match="model.map_layer1.weight"):
        load_edm_pickle(path)
    good = _perturbed(cfg)
    path = write_pkl(tmp_path / "ncsnpp.pkl", fakes, dict(ema=good), good, "EDMPrecond",
                     dict(kw, embedding_type="fourier"))
    with pytest.raises(ConvertError, match="embedding_type"):
        load_edm_pickle(path)
    path = write_pkl(tmp_path / "adm.pkl", fakes, dict(ema=good), good, "EDMPrecond",
                     dict(kw, model_type="DhariwalUNet"))
    with pytest.raises(ConvertError, match="DhariwalUNet"):
        load_edm_pickle(path)
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ConvertError, match="no network"):
        load_edm_pickle(path)
