"""Inert checkpoints: exact round trips, atomic writes, strict loading with clear errors."""
import json
import os

import pytest
import torch

from sctlib.checkpoints import (CheckpointError, git_sha, load_model, load_tree, model_paths, read_tree_meta,
                                save_model, save_tree)
from sctlib.config import NetConfig, to_dict
from sctlib.networks import NET_PRESETS, build_network


def _equal_trees(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _equal_trees(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal_trees(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def _adam_state(seed=0):
    torch.manual_seed(seed)
    net = build_network("mlp-toy")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 2), torch.rand(8) + 0.1).square().mean().backward()
        opt.step()
    return net, opt


def test_tree_roundtrip_adam_state(tmp_path):
    net, opt = _adam_state()
    tree = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "nimg": 1234, "stage": 2,
            "extras": [1.5, float("inf"), None, True, "x", (1, 2)], "weird/key": {3: torch.zeros(0)},
            "scalar": torch.tensor(2.5, dtype=torch.float64), "bf": torch.ones(2, dtype=torch.bfloat16)}
    p = save_tree(tmp_path / "state.safetensors", tree, meta={"nimg": 1234})
    back = load_tree(p)
    _equal_trees(tree, back)
    assert read_tree_meta(p) == {"nimg": 1234}
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert set(back["optimizer"]["state"]) == set(opt.state_dict()["state"])  # int keys stay ints

    # load into a fresh optimizer and take identical steps
    torch.manual_seed(1)
    net2 = build_network("mlp-toy")
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.Adam(net2.parameters(), lr=5.0)  # wrong hyper-parameters, overwritten by the load
    opt2.load_state_dict(back["optimizer"])
    torch.set_rng_state(back["rng"])
    x = torch.randn(8, 2)
    for o, n in ((opt, net), (opt2, net2)):
        o.zero_grad()
        n(x, torch.full((8,), 0.7)).square().mean().backward()
        o.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_tree_rejects_unsupported_values(tmp_path):
    with pytest.raises(TypeError, match="set"):
        save_tree(tmp_path / "x.safetensors", {"a": {1, 2}})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_load_tree_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tree(tmp_path / "missing.safetensors")
    p = save_tree(tmp_path / "t.safetensors", {"w": torch.randn(100)})
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):
        load_tree(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_tree(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("name", ["ddpmpp-tiny", "edm2-tiny", "mlp-toy"])
def test_model_roundtrip_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    cfg = NET_PRESETS[name]
    net = build_network(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sha = git_sha()
    save_model(tmp_path / "final", net, net_config=cfg, meta={"git_sha": sha, "nimg": 640, "ema": "traditional"})
    st, js = model_paths(tmp_path / "final")
    assert st.is_file() and js.is_file()
    info_json = json.loads(js.read_text())
    assert info_json["net_config"] == to_dict(cfg) and info_json["meta"]["nimg"] == 640
    for variant in ("final", "final.safetensors", "final.json"):
        model, info = load_model(tmp_path / variant)
        assert not model.training and info["meta"]["ema"] == "traditional"
        if cfg.arch == "mlp":
            x = torch.randn(5, 2)
        else:
            x = torch.randn(5, cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
        labels = torch.arange(5) % cfg.label_dim if cfg.label_dim else None
        sigma = torch.linspace(0.01, 20, 5)
        assert torch.equal(net(x, sigma, labels), model(x, sigma, labels))
    # no temporary files left behind by the atomic writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.json", "final.safetensors"]


def test_load_model_mismatch_names_keys_and_shapes(tmp_path):
    net = build_network("ddpmpp-tiny")
    sd = net.state_dict()
    sd.pop("model.map_layer0.bias")
    sd["model.extra.weight"] = torch.zeros(3)
    sd["model.map_layer1.weight"] = torch.zeros(5, 5)
    save_model(tmp_path / "bad", sd, net_config=NET_PRESETS["ddpmpp-tiny"])
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad")
    msg = str(e.value)
    assert "model.map_layer0.bias" in msg and "model.extra.weight" in msg and "model.map_layer1.weight" in msg


def test_load_model_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="json"):
        load_model(tmp_path / "nothing")
    save_model(tmp_path / "m", build_network("mlp-toy"), net_config=NET_PRESETS["mlp-toy"])
    (tmp_path / "m.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="sctlib-model"):
        load_model(tmp_path / "m")
    (tmp_path / "m.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="JSON"):
        load_model(tmp_path / "m")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import sctlib.checkpoints as ck

    p = save_tree(tmp_path / "s.safetensors", {"a": torch.ones(3)})
    before = p.read_bytes()
    with pytest.raises(TypeError):
        save_tree(p, {"a": torch.zeros(3), "b": object()})

    def crash(tensors, filename, metadata=None):  # a writer that dies half-way (disk full, kill)
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_tree(p, {"a": torch.zeros(3)})
    assert p.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["s.safetensors"]
    torch.testing.assert_close(load_tree(p)["a"], torch.ones(3))


def test_git_sha(tmp_path):
    sha = git_sha()
    assert sha is None or (len(sha) == 40 and int(sha, 16) >= 0)
    assert git_sha(tmp_path) is None  # a temporary folder is not inside a repository
