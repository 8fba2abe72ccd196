"""Hostile and clumsy input (issue 10): each test is the attack or the mistake it defends against.

Crafted files are written opcode by opcode (as an attacker would), memory is measured as the peak
resident set of a child process over its own bare import (ru_maxrss), and every command-line failure
must be ONE line on stderr with exit code 2 that leaves no output behind.
"""
import collections
import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sctlib import checkpoints, config as C, convert as CV, rundir, train as T
from sctlib.errors import is_expected, one_line
from sctlib.safepickle import UnsafePickleError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
GIB_KB = 1 << 20  # ru_maxrss is in KiB on Linux

# ------------------------------------------------------------------------------------------------ crafting


def _op(x) -> bytes:
    """Opcodes that push the plain value x (protocol 3, without PROTO and STOP)."""
    return pickle.dumps(x, protocol=3)[2:-1]


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(fn: bytes, *args: bytes) -> bytes:
    return fn + b"(" + b"".join(args) + b"tR"


# memo slots far above the ones the _op() fragments use for themselves
PUT_A, GET_A = b"r" + struct.pack("<I", 90001), b"j" + struct.pack("<I", 90001)
PUT_B, GET_B = b"r" + struct.pack("<I", 90002), b"j" + struct.pack("<I", 90002)


def _pkl(body: bytes) -> bytes:
    return b"\x80\x03" + body + b"."


def _storage_blob(values) -> bytes:
    """A legacy torch.save stream of one float storage, as EDM's plain pickles embed them."""
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what EDM's files hold
        warnings.simplefilter("ignore")
        storage = torch.tensor(values, dtype=torch.float32).storage()
    torch.save(storage, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _tensor_ops(values, offset, size, stride) -> bytes:
    """torch._utils._rebuild_tensor_v2(_load_from_bytes(blob), offset, size, stride, False, OrderedDict())."""
    storage = _call(_g("torch.storage", "_load_from_bytes"), _op(_storage_blob(values)))
    return _call(_g("torch._utils", "_rebuild_tensor_v2"), storage, _op(offset), _op(tuple(size)),
                 _op(tuple(stride)), _op(False), _call(_g("collections", "OrderedDict")))


def _dict_ops(items) -> bytes:
    """{key: <opcodes>} -> opcodes of a dict (values are raw opcode strings)."""
    return b"}(" + b"".join(_op(k) + v for k, v in items) + b"u"


def _measured(module: str, args, tmp_path, preload: str = "") -> dict:
    """Run ``python -m module args`` in a child after a bare import; return rc, stderr and the peak RSS growth."""
    script = textwrap.dedent(f"""
        import importlib, json, resource, sys
        mod = importlib.import_module({module!r})  # the bare import: the baseline
        {preload}
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            rc = mod.main({list(map(str, args))!r})
        except SystemExit as e:
            rc = e.code
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"rc": rc, "delta_kb": peak - base}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                       timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["stderr"] = r.stderr
    return out


def _one_line_error(stderr: str, *needles):
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in stderr


# ------------------------------------------------------------------------------------------------ 1. uninitialised memory


@pytest.mark.parametrize("offset,size", [(0, (1000,)), (10, (4,)), (3, (2,))])
def test_tensor_longer_than_its_storage_is_refused_not_grown(tmp_path, offset, size):
    path = tmp_path / "short.pkl"
    path.write_bytes(_pkl(_dict_ops([("w", _tensor_ops([1.0, 2.0, 3.0, 4.0], offset, size, (1,)))])))
    with pytest.raises(CV.ConvertError, match="reaches element|past the end"):
        CV.read_snapshot(path)


def test_storage_whose_declared_count_exceeds_its_bytes_is_refused(tmp_path):
    blob = bytearray(_storage_blob([1.0, 2.0]))
    # the 8-byte element count precedes the data: claim 2**30 elements over 8 bytes of data
    blob[-16:-8] = struct.pack("<q", 1 << 30)
    body = _call(_g("torch.storage", "_load_from_bytes"), _op(bytes(blob)))
    path = tmp_path / "count.pkl"
    path.write_bytes(_pkl(body))
    with pytest.raises(CV.ConvertError, match="declares"):
        CV.read_snapshot(path)


def test_legit_tensor_views_still_read(tmp_path):
    path = tmp_path / "ok.pkl"
    path.write_bytes(_pkl(_dict_ops([("w", _tensor_ops([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0, (2, 3), (3, 1))),
                                     ("t", _tensor_ops([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0, (3, 2), (1, 3)))])))
    top, kind = CV.read_snapshot(path)
    assert kind == "pickle"
    assert torch.equal(top["w"], torch.arange(1.0, 7.0).reshape(2, 3))
    assert torch.equal(top["t"], torch.arange(1.0, 7.0).reshape(2, 3).T)


# ------------------------------------------------------------------------------------------------ 2. unbounded memory


def _void_scalar_ops() -> bytes:
    dtype = _call(_g("numpy", "dtype"), _op("V1073741824"), _op(False), _op(True))
    return _call(_g("numpy.core.multiarray", "scalar"), dtype)  # no data: numpy allocates the item zeroed


def test_numpy_void_dtype_bomb_is_refused_within_memory(tmp_path):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(_pkl(b"(" + _void_scalar_ops() + _void_scalar_ops() + b"l"))
    assert path.stat().st_size < 200
    r = _measured("sctlib.convert", [path, tmp_path / "out"], tmp_path)
    assert r["rc"] == 2
    _one_line_error(r["stderr"], "bomb.pkl", "dtype")
    assert r["delta_kb"] < GIB_KB, r
    assert not (tmp_path / "out").exists()


def test_numpy_void_dtype_bomb_through_data_convert_cifar10(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    for i in range(1, 6):
        (src / f"data_batch_{i}").write_bytes(_pkl(b"(" + _void_scalar_ops() + _void_scalar_ops() + b"l"))
    r = _measured("sctlib.data.__main__", ["convert", "cifar10", src, tmp_path / "new" / "c.zip", "--no-progress"],
                  tmp_path)
    assert r["rc"] == 2
    _one_line_error(r["stderr"], "data_batch_1")
    assert r["delta_kb"] < GIB_KB, r
    assert not (tmp_path / "new").exists()  # the folder made for the output is gone again


def test_numpy_reconstruct_cannot_allocate_a_declared_shape():
    from sctlib.data.convert import ConversionError, safe_unpickle

    body = _call(_g("numpy.core.multiarray", "_reconstruct"), _g("numpy", "ndarray"), _op((1 << 40,)), _op(b"b"))
    with pytest.raises(ConversionError, match="_reconstruct"):
        safe_unpickle(_pkl(body), source="recon")
    body = _call(_g("numpy", "ndarray"), _op((1 << 40,)))  # ndarray(shape) allocates too
    with pytest.raises(ConversionError, match="ndarray"):
        safe_unpickle(_pkl(body), source="ndarray")


@pytest.mark.parametrize("wrap_in_set", [True, False])
def test_stride0_views_are_refused_within_memory(tmp_path, wrap_in_set):
    # one stored float seen as 10^8 elements: set() iterates it, the converter would materialise it
    t = _tensor_ops([1.0], 0, (100_000_000,), (0,))
    body = _call(_g("builtins", "set"), b"(" + t + b"l") if wrap_in_set else _dict_ops([(f"w{i}", t) for i in range(8)])
    path = tmp_path / "stride0.pkl"
    path.write_bytes(_pkl(body))
    r = _measured("sctlib.convert", [path, tmp_path / "out"], tmp_path)
    assert r["rc"] == 2
    _one_line_error(r["stderr"], "stride0.pkl", "overlaps itself")
    assert r["delta_kb"] < GIB_KB, r
    assert not (tmp_path / "out").exists()


def test_set_of_a_tensor_is_refused():
    body = _call(_g("builtins", "set"), b"(" + _tensor_ops([1.0, 2.0], 0, (2,), (1,)) + b"l")
    with pytest.raises(UnsafePickleError, match="set"):
        CV.RestrictedUnpickler(io.BytesIO(_pkl(body))).load()


def test_many_views_of_one_storage_exceed_the_file_budget(tmp_path):
    # each view is legal on its own; together they would materialise far more than the file holds
    vals = [0.0] * 4096
    storage = _call(_g("torch.storage", "_load_from_bytes"), _op(_storage_blob(vals)))
    body = storage + PUT_B + b"0"  # memoise the storage once, then reference it
    view = _call(_g("torch._utils", "_rebuild_tensor_v2"), GET_B, _op(0), _op((4096,)), _op((1,)), _op(False),
                 _call(_g("collections", "OrderedDict")))
    body += _dict_ops([(f"w{i}", view) for i in range(2000)])
    path = tmp_path / "views.pkl"
    path.write_bytes(_pkl(body))
    with pytest.raises(CV.ConvertError, match="exceeds what the file can hold"):
        CV.read_snapshot(path)


def test_deflated_record_in_a_torch_zip_is_refused_within_memory(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"net": torch.zeros(96 << 20, dtype=torch.uint8)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    plain.unlink()
    assert bomb.stat().st_size < (2 << 20)
    r = _measured("sctlib.convert", [bomb, tmp_path / "out"], tmp_path)
    assert r["rc"] == 2
    _one_line_error(r["stderr"], "bomb.pt", "compressed")
    assert r["delta_kb"] < GIB_KB, r


# ------------------------------------------------------------------------------------------------ BUILD, structure tricks


def test_build_on_an_allowed_class_cannot_rebind_its_methods():
    repr_before = CV.PersistentObject.__repr__
    body = (_g("torch_utils.persistence", "_reconstruct_persistent_obj") + b"N}" + _op("__repr__")
            + _g("builtins", "getattr") + b"s\x86b")
    with pytest.raises(UnsafePickleError, match="BUILD|__repr__"):
        CV.RestrictedUnpickler(io.BytesIO(_pkl(body))).load()
    assert CV.PersistentObject.__repr__ is repr_before
    body = _g("torch._utils", "_rebuild_tensor_v2") + b"N}" + _op("__defaults__") + _op((1,)) + b"s\x86b"
    with pytest.raises(UnsafePickleError):
        CV.RestrictedUnpickler(io.BytesIO(_pkl(body))).load()
    body = _g("torch_utils.persistence", "_reconstruct_persistent_obj") + b"}" + _op("x") + _op(1) + b"sb"
    with pytest.raises(UnsafePickleError):  # BUILD with a dict state on the class
        CV.RestrictedUnpickler(io.BytesIO(_pkl(body))).load()
    body = _g("torch.nn.modules.container", "ModuleDict") + b"}" + _op("x") + _op(1) + b"sb"
    with pytest.raises(UnsafePickleError):  # ... on a module stub class (it has a __setstate__ for instances)
        CV.RestrictedUnpickler(io.BytesIO(_pkl(body))).load()
    # a class without __setstate__: BUILD's slot-state branch calls setattr(cls, ...) directly
    easy_repr = CV.EasyDictStub.__repr__
    body = _g("dnnlib.util", "EasyDict") + b"N}" + _op("__repr__") + _g("builtins", "getattr") + b"s\x86b"
    with pytest.raises(UnsafePickleError, match="__repr__"):
        CV.RestrictedUnpickler(io.BytesIO(_pkl(body))).load()
    assert CV.EasyDictStub.__repr__ is easy_repr


def _stub(state_items) -> bytes:
    """A torch.nn module stub created by NEWOBJ, memoised as 0, then BUILD with the given state."""
    return _g("torch.nn.modules.container", "ModuleDict") + b")\x81" + PUT_A + _dict_ops(state_items) + b"b"


def test_self_referential_module_is_one_line(tmp_path):
    path = tmp_path / "cycle.pkl"
    path.write_bytes(_pkl(_stub([("_modules", _dict_ops([("unet", GET_A)]))])))
    with pytest.raises(CV.ConvertError, match="contains itself"):
        CV.state_dict_from_pickle(path)
    r = subprocess.run([sys.executable, "-m", "sctlib.convert", str(path), str(tmp_path / "out")],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 2
    _one_line_error(r.stderr, "cycle.pkl")


@pytest.mark.parametrize("kwargs", [_op([1, 2]), _op("abc"), _op(5)])
def test_init_kwargs_not_a_dict(tmp_path, kwargs):
    inner = _g("torch.nn.modules.container", "ModuleDict") + b")\x81"
    path = tmp_path / "kw.pkl"
    path.write_bytes(_pkl(_stub([("_init_kwargs", kwargs), ("_modules", _dict_ops([("unet", inner)]))])))
    with pytest.raises(CV.ConvertError, match="_init_kwargs of .* expected a dict"):
        CV.state_dict_from_pickle(path)


def test_persistent_id_trick_in_a_torch_zip_is_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"a": 1}, good)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = _pkl(_op(("not-a-storage", 1)) + b"Q")  # BINPERSID with a foreign id
            zout.writestr(info.filename, data)
    with pytest.raises(CV.ConvertError):
        CV.read_snapshot(evil)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(_pkl(_op(("storage", 1)) + b"Q"))
    with pytest.raises(CV.ConvertError):
        CV.read_snapshot(plain)


# ------------------------------------------------------------------------------------------------ convert CLI destinations


def test_convert_destination_mistakes_are_one_line_and_leave_nothing(tmp_path, capsys):
    src = tmp_path / "snap.pkl"
    src.write_bytes(_pkl(_stub([("_modules", _dict_ops([("unet", GET_A)]))])))
    before = src.read_bytes()
    # destination equal to the source, a file, under a file
    (tmp_path / "afile").write_text("x")
    for dst, needle in [(src, "is a file"), (tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "afile")]:
        assert CV.main([str(src), str(dst)]) == 2
        _one_line_error(capsys.readouterr().err, needle)
    assert src.read_bytes() == before
    # a failing conversion leaves no folders behind
    assert CV.main([str(src), str(tmp_path / "a" / "b")]) == 2
    _one_line_error(capsys.readouterr().err, "snap.pkl")
    assert not (tmp_path / "a").exists()


def test_hostile_init_pickle_is_a_one_line_training_error(tmp_path, capsys):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_pkl(_call(_g("os", "system"), _op("echo pwned"))))
    rc = T.main(["--preset", "toy2d-ect", "--run-dir", str(tmp_path / "run"), "--no-progress", "device=cpu",
                 f"init={evil}"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "evil.pkl", "os.system")


# ------------------------------------------------------------------------------------------------ 8. one-line config errors


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=-1", "optim.lr"), ("loss.task=foo", "loss.task"), ("dataset=foo", "dataset"),
    ("net.dropout=1.5", "net.dropout"), ("seed=-1", "seed"), ("total_nimg=inf", "total_nimg"),
    ("keep_checkpoints=0", "keep_checkpoints"), ("keep_checkpoints=-1", "keep_checkpoints"),
    ("optim.lr=nan", "optim.lr"), ("batch_size=0", "batch_size"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, capsys, override, needle):
    for extra in (["--print-config"], ["--run-dir", str(tmp_path / "run")]):
        rc = T.main(["--preset", "toy2d-ect", "--no-progress", "device=cpu", override, *extra])
        assert rc == 2
        _one_line_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only machine's message")
def test_device_cuda_on_a_cpu_machine_is_one_line(tmp_path, capsys):
    rc = T.main(["--preset", "toy2d-ect", "--run-dir", str(tmp_path / "run"), "--no-progress", "device=cuda"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "device", "CUDA")


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("not a folder")
    rc = T.main(["--preset", "toy2d-ect", "--run-dir", str(f), "--no-progress", "device=cpu", "total_nimg=256",
                 "batch_size=256"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, str(f))
    assert f.read_text() == "not a folder"


def test_expected_failures_are_user_errors():
    assert is_expected(T.NonFiniteError("x")) and is_expected(CV.UnsafePickleError("x"))
    assert is_expected(C.ConfigError("x")) and is_expected(checkpoints.CheckpointError("x"))
    assert not is_expected(KeyError("bug")) and not is_expected(AssertionError())
    e = OSError(28, "No space left on device", "/runs/x/final.safetensors")
    assert "/runs/x/final.safetensors" in one_line(e) and "\n" not in one_line(e)


# ------------------------------------------------------------------------------------------------ 3-7. run directories

TOY = ["device=cpu", "batch_size=256", "tick_nimg=256", "checkpoint_nimg=256", "total_nimg=768",
       "ema_halflife_nimg=500", "keep_checkpoints=5"]


def _cfg(*extra):
    return T.resolve_config("toy2d-ect", [*TOY, *extra])


def _ckpts(run):
    return sorted(p.name for p in (Path(run) / "checkpoints").glob("ckpt-*.safetensors"))


def test_resume_with_another_config_is_refused_even_without_config_json(tmp_path):
    T.train(_cfg(), tmp_path, progress=False)
    (tmp_path / "config.json").unlink()
    with pytest.raises(rundir.RunDirError, match=r"different config .*optim\.lr.*seed"):
        T.train(_cfg("total_nimg=1024", "optim.lr=1e-5", "seed=7"), tmp_path, progress=False)
    # a changed width is refused by name, before any tensor is loaded (not a raw size mismatch)
    with pytest.raises(rundir.RunDirError, match=r"different network .*net\.model_channels"):
        T.train(_cfg("total_nimg=1024", "net.model_channels=64"), tmp_path, progress=False)
    with pytest.raises(rundir.RunDirError):  # the flag cannot make other shapes load
        T.train(_cfg("total_nimg=1024", "net.model_channels=64"), tmp_path, progress=False, allow_config_change=True)
    # a resumable change (longer run) needs no flag
    out = T.train(_cfg("total_nimg=1024"), tmp_path, progress=False)
    assert out["nimg"] == 1024


def test_deliberate_change_is_possible_with_the_flag_and_recorded(tmp_path, capsys):
    T.train(_cfg(), tmp_path, progress=False)
    rc = T.main(["--preset", "toy2d-ect", "--run-dir", str(tmp_path), "--no-progress", *TOY, "total_nimg=1024",
                 "optim.lr=1e-4"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "optim.lr", "--change-config")
    rc = T.main(["--preset", "toy2d-ect", "--run-dir", str(tmp_path), "--no-progress", *TOY, "total_nimg=1024",
                 "optim.lr=1e-4", "--change-config"])
    assert rc == 0
    hist = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
    changes = [h for h in hist if h.get("changed")]
    assert len(changes) == 1 and changes[0]["changed"]["optim.lr"] == [5e-4, 1e-4] and changes[0]["nimg"] == 768
    assert json.loads((tmp_path / "config.json").read_text())["config"]["optim"]["lr"] == 1e-4


def test_a_second_process_is_stopped_by_the_lock(tmp_path):
    run = tmp_path / "run"
    a = subprocess.Popen([sys.executable, "-m", "sctlib.train", "--preset", "toy2d-ect", "--run-dir", str(run),
                          "--no-progress", *TOY, "total_nimg=2560000", "checkpoint_nimg=0", "tick_nimg=25600"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        lock = run / rundir.LOCK_NAME
        for _ in range(600):
            if lock.exists() and lock.stat().st_size:
                break
            if a.poll() is not None:
                raise AssertionError(a.stderr.read().decode())
            import time

            time.sleep(0.1)
        assert json.loads(lock.read_text())["pid"] == a.pid
        b = subprocess.run([sys.executable, "-m", "sctlib.train", "--preset", "toy2d-ect", "--run-dir", str(run),
                            "--no-progress", *TOY, "optim.lr=1e-5"], capture_output=True, text=True, env=ENV)
        assert b.returncode == 2
        _one_line_error(b.stderr, f"pid {a.pid}", "in use")
    finally:
        a.kill()
        a.wait()
    # the killed owner left a stale lock: the next run takes it over
    assert (run / rundir.LOCK_NAME).exists()
    T.train(_cfg(), run, progress=False)
    assert not (run / rundir.LOCK_NAME).exists()


def test_lock_of_a_live_process_on_this_host_is_respected_and_foreign_hosts_are_not_guessed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / rundir.LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(rundir.RunDirError, match="in use"):
        rundir.RunLock(run).acquire()
    lock.write_text(json.dumps({"host": "elsewhere.example", "pid": 1}))
    with pytest.raises(rundir.RunDirError, match="elsewhere.example"):
        rundir.RunLock(run).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    with rundir.RunLock(run):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_init_ema_false_starts_from_the_online_weights(tmp_path):
    src = tmp_path / "src"
    T.train(_cfg(), src, progress=False)
    ema = checkpoints.load_model(src / "final")[0].state_dict()
    online = checkpoints.load_model(src / "final_net")[0].state_dict()
    assert any(not torch.equal(ema[k], online[k]) for k in ema)
    for init, want in [(src, None), (src / "checkpoints" / _ckpts(src)[-1], None)]:
        for init_ema, ref in ((True, ema), (False, online)):
            tr = T.Trainer(_cfg(f"init={init}", f"init_ema={init_ema}"), tmp_path / f"r{init_ema}", progress=False)
            got = tr.net.state_dict()
            for k in ref:
                assert torch.equal(got[k], ref[k]), (init, init_ema, k)


def test_nonfinite_streak_no_checkpoint_inside_and_the_advice_works(tmp_path):
    cfg = _cfg("total_nimg=2560", "max_nonfinite_steps=3")
    tr = T.Trainer(cfg, tmp_path, progress=False)
    step = tr.train_step

    def poisoned_step():
        if tr.nimg == 768:  # the weights blow up after three good steps
            with torch.no_grad():
                next(tr.net.parameters()).fill_(float("inf"))
        step()

    tr.train_step = poisoned_step
    with pytest.raises(T.NonFiniteError) as e:
        tr.run()
    msg = str(e.value)
    assert "\n" not in msg
    assert "ckpt-000000000768.safetensors" in msg and "images 768..1536" in msg
    assert "optim.lr=0.000125" in msg and "--change-config" in msg
    assert _ckpts(tmp_path)[-1] == "ckpt-000000000768.safetensors"  # nothing written inside the streak
    ticks = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    inside = [t for t in ticks if t["nimg"] > 768]
    assert inside and all(t["loss"] is None and t["loss_count"] == 0 and t["nonfinite_losses"] > 0 for t in inside)
    assert all(isinstance(t["loss"], float) and t["loss_count"] > 0 for t in ticks if t["nimg"] <= 768)
    # following the advice: a lower lr in the same directory, with the flag
    out = T.train(_cfg("total_nimg=2560", "max_nonfinite_steps=3", "optim.lr=0.000125"), tmp_path, progress=False,
                  allow_config_change=True)
    assert out["nimg"] == 2560
    ticks = [json.loads(l)["nimg"] for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert ticks == sorted(set(ticks))  # the streak's ticks were replaced, not repeated


def test_replayed_ticks_are_not_repeated_and_stale_temp_files_are_removed(tmp_path):
    T.train(_cfg("total_nimg=1024"), tmp_path, progress=False)
    # a kill after the 768 checkpoint: the newer checkpoint and the final files never happened
    (tmp_path / "checkpoints" / "ckpt-000000001024.safetensors").unlink()
    for p in tmp_path.glob("final*"):
        p.unlink()
    stale = [tmp_path / ".final.safetensors.x1y2.tmp", tmp_path / "checkpoints" / ".ckpt-000000001024.safetensors.ab.tmp",
             tmp_path / "config.json.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    T.train(_cfg("total_nimg=1024"), tmp_path, progress=False)
    assert not any(p.exists() for p in stale)
    ticks = [json.loads(l)["nimg"] for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert ticks == [256, 512, 768, 1024]


def test_torn_final_pair_is_refused_by_load_run(tmp_path):
    T.train(_cfg(), tmp_path, progress=False)
    old_json = (tmp_path / "final.json").read_text()
    model, info = T.load_run(tmp_path)
    # a second write of final.* killed between the .safetensors and the .json
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    checkpoints.save_model(tmp_path / "final", model, net_config=info["net_config"],
                           meta={**info["meta"], "nimg": 999})
    (tmp_path / "final.json").write_text(old_json)
    with pytest.raises(checkpoints.CheckpointError, match="do not belong together"):
        T.load_run(tmp_path)


def test_disk_full_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", full)
    with pytest.raises(OSError) as e:
        T.train(_cfg(), tmp_path, progress=False)
    # the first file the run writes is its first EMA snapshot (25% of training), then the first checkpoint
    assert e.value.errno == 28 and "snapshots/ema-0.25.safetensors" in one_line(e.value)
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------------ 6, 8. data CLI


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels: signature, IHDR, an empty IDAT and IEND (a decompression-bomb header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_data_convert_onto_its_own_source_is_refused(tmp_path, capsys):
    from sctlib.data.__main__ import main

    src = tmp_path / "same.zip"  # a valid Imagenet64 part archive: without the check it would be replaced
    batch = io.BytesIO()
    np.savez(batch, data=np.zeros((2, 3 * 64 * 64), np.uint8), labels=np.array([1, 2]))
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("train_data_batch_1.npz", batch.getvalue())
    before = src.read_bytes()
    assert main(["convert", "imagenet64", str(src), str(src), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "same.zip", "source")
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.zip"]


def test_data_convert_to_a_directory_is_refused_before_converting(tmp_path, capsys, monkeypatch):
    from sctlib.data import convert as dcv
    from sctlib.data.__main__ import main

    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    (tmp_path / "x.zip").mkdir()
    monkeypatch.setattr(dcv, "_cifar_batches", lambda *a: pytest.fail("the source was read before the check"))
    assert main(["convert", "cifar10", str(src), str(tmp_path / "x.zip"), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "x.zip", "directory")


def test_decompression_bombs_are_one_line_in_convert_info_and_training(tmp_path, capsys):
    from sctlib.data.__main__ import main

    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    assert main(["convert", "folder", str(tmp_path / "imgs"), str(tmp_path / "out" / "o.zip"), "--no-progress",
                 "--resolution", "8"]) == 2
    _one_line_error(capsys.readouterr().err, "bomb.png")
    assert not (tmp_path / "out").exists()
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("00000/img00000000.png", _png_header(100_000, 100_000))
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    assert main(["info", str(z)]) == 2
    _one_line_error(capsys.readouterr().err, "bomb.zip", "img00000000.png")
    rc = T.main(["--preset", "toy2d-ect", "--run-dir", str(tmp_path / "run"), "--no-progress", "device=cpu",
                 "dataset=edmzip", f"data_path={z}", "net.arch=ddpmpp"])
    assert rc == 2
    _one_line_error(capsys.readouterr().err, "bomb.zip")


def test_zip_member_declaring_a_huge_size_is_refused(tmp_path, monkeypatch):
    from sctlib.data import edmzip

    monkeypatch.setattr(edmzip, "MAX_MEMBER_BYTES", 10_000)  # the same check at a test-sized cap
    z = tmp_path / "big.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:  # deflate: 10 KB of zeros is a few bytes
        zf.writestr("00000/img00000000.png", b"\0" * 10_001)
    with pytest.raises(edmzip.DataError, match="declares"):
        edmzip.EDMZipDataset(z)


def test_compressed_batches_that_expand_without_bound_are_refused(tmp_path, monkeypatch, capsys):
    """Imagenet64 part zips, npz batches and the CIFAR tar.gz: sizes checked before decompressing (the
    thresholds are lowered so that the test archives stay small; the checks are the same)."""
    import tarfile

    from sctlib.data import convert as dcv
    from sctlib.data.__main__ import main

    monkeypatch.setattr(dcv, "RATIO_FROM_BYTES", 10_000)
    part = tmp_path / "Imagenet64_train_part1.zip"
    with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_data_batch_1", b"\0" * 1_000_000)  # expands ~1000x
    assert main(["convert", "imagenet64", str(part), str(tmp_path / "o.zip"), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "train_data_batch_1", "decompression bomb")
    npz = tmp_path / "batches" / "train_data_batch_1.npz"
    npz.parent.mkdir()
    np.savez_compressed(npz, data=np.zeros((100, 3 * 64 * 64), np.uint8), labels=np.ones(100, np.int64))
    assert main(["convert", "imagenet64", str(npz.parent), str(tmp_path / "o.zip"), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "train_data_batch_1.npz", "decompression bomb")
    monkeypatch.setattr(dcv, "MAX_CIFAR_MEMBER_BYTES", 1000)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for n in dcv.CIFAR_TRAIN:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            info.size = 5000
            tf.addfile(info, io.BytesIO(b"\0" * 5000))
    assert main(["convert", "cifar10", str(tgz), str(tmp_path / "o.zip"), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "data_batch_1", "cap")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([part.name, "batches", tgz.name])


def test_settings_added_after_a_run_started_do_not_block_its_resume():
    new = {"optim": {"lr": 1e-3}, "added": {"knob": 1}}
    defaults = {"optim": {"lr": 5e-4}, "added": {"knob": 1}}
    stored = {"optim": {"lr": 1e-3}, "removed": 3}  # written before 'added.knob' existed, when 'removed' did
    assert rundir.compare_configs(stored, new, resumable=(), allow_change=False, where="r", defaults=defaults) == {}
    with pytest.raises(rundir.RunDirError, match="added.knob"):  # a non-default value is a change
        rundir.compare_configs(stored, {**new, "added": {"knob": 2}}, resumable=(), allow_change=False, where="r",
                               defaults=defaults)


def test_a_run_from_before_a_new_setting_resumes(tmp_path):
    """Settings added to sctlib after a run started (optim.impl, compile_mode) are absent from its config.json;
    at their defaults they count as unchanged, so the run resumes."""
    T.train(_cfg(), tmp_path, progress=False)
    cj = tmp_path / "config.json"
    rec = json.loads(cj.read_text())
    del rec["config"]["optim"]["impl"], rec["config"]["compile_mode"]
    cj.write_text(json.dumps(rec))
    T.train(_cfg("total_nimg=1024"), tmp_path, progress=False)
    assert _ckpts(tmp_path)[-1] == f"ckpt-{1024:012d}.safetensors"
    # a real change is still refused by the same check
    rec = json.loads(cj.read_text())
    rec["config"]["optim"]["lr"] = 0.5
    cj.write_text(json.dumps(rec))
    with pytest.raises(rundir.RunDirError, match="different config"):
        T.train(_cfg("total_nimg=1280"), tmp_path, progress=False)
