"""Read EDM, EDM2 and ECT snapshots without running any code from them.

The published checkpoints are *persistence pickles* (NVlabs ``torch_utils.persistence``): each network
object is stored as ``_reconstruct_persistent_obj(meta)`` with ``meta = {type: 'class', version,
module_src: <python source>, class_name, state: <obj.__dict__>}``, and loading them with ``pickle``
``exec``s ``module_src``. Here a restricted :class:`pickle.Unpickler` resolves only an allowlist of
globals (tensor rebuilders, ``OrderedDict``, numpy scalars, ...). The reconstructor is replaced by a
stub that keeps ``class_name`` and ``state`` and never looks at the source; ``torch.nn`` modules become
inert stubs holding their ``__dict__``. Any other global - ``os.system``, ``eval``, an unknown class -
stops the load with :class:`UnsafePickleError` before anything is called.

The state dict is then read off the stub tree (``_parameters``, persistent ``_buffers``, ``_modules``
in order - the same keys and order as ``module.state_dict()``), the architecture is recovered from the
tensor shapes plus the constructor kwargs that persistence records, and an sctlib network is built and
loaded strictly. Formats (as written by NVlabs/edm ``training/training_loop.py``, NVlabs/edm2
``training/training_loop.py`` and locuslab/ect; ``torch_utils/persistence.py`` records the classes):

* EDM ``network-snapshot-*.pkl`` (``EDMPrecond`` + ``SongUNet``): ``dict(ema=..., loss_fn=..., ...)``;
* ECT CIFAR-10 snapshots (``ECMPrecond``) and ECT ``training-state-*.pt`` (``torch.save`` zip with
  ``net``, ``optimizer_state`` and, on the ImageNet branch, ``ema_state`` / ``online_ema_state``);
* EDM2 snapshots (``Precond`` + ``UNet``, float16 weights, ``EasyDict`` top level) and ECT ImageNet ones.

CLI: ``python -m sctlib.convert SRC DST_DIR [--which W]`` writes ``DST_DIR/model.safetensors`` and
``DST_DIR/model.json`` (our inert format, :mod:`sctlib.checkpoints`).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from . import safepickle as _sp
from .checkpoints import CheckpointError, _strict_load, git_sha, save_model
from .config import NetConfig, to_dict
from .errors import UserError, cli_main

__all__ = ["load_edm_pickle", "state_dict_from_pickle", "read_snapshot", "convert", "UnsafePickleError",
           "ConvertError", "RestrictedUnpickler", "MAX_SNAPSHOT_BYTES", "main"]


class ConvertError(UserError, ValueError):
    """The file is not a snapshot this converter understands (truncated, wrong structure, unsupported arch)."""


class UnsafePickleError(ConvertError, _sp.UnsafePickleError):
    """The pickle asks for a global outside the allowlist (or tampers with one). Nothing was executed."""


# Hard cap on the tensor bytes one snapshot may materialise (the largest published EDM2 snapshot, XXL
# with its EMAs, is ~6 GB); the effective budget is also never more than the file's own size.
MAX_SNAPSHOT_BYTES = 32 << 30
MAX_DEPTH = 200  # module nesting of a real network is < 20


# ------------------------------------------------------------------------------------------------ stubs

class PersistentObject(metaclass=_sp.FrozenMeta):
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` becomes: a record, never code."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
            raise ConvertError("malformed persistence record: expected meta = {type: 'class', class_name, state, ...}")
        self.class_name = meta["class_name"]
        self.version = meta.get("version")
        src = meta.get("module_src")
        # fingerprint of the embedded source, for the record; the source itself is never executed
        self.module_src_sha256 = hashlib.sha256(src.encode("utf-8", "replace")).hexdigest() if isinstance(src, str) else None
        self.state = meta.get("state") if isinstance(meta.get("state"), dict) else {}

    def __setstate__(self, state=None):  # state=None: BUILD on the class calls cls.__setstate__(state)
        raise UnsafePickleError("refused: BUILD applied to a persistence record (a real snapshot never does this)")

    def __repr__(self):
        return f"<persistent {self.class_name}>"


class TorchModuleStub(metaclass=_sp.FrozenMeta):
    """Stand-in for a ``torch.nn`` module class (e.g. ``ModuleDict``): keeps the pickled ``__dict__``."""

    class_name = "torch.nn.Module"

    def __init__(self, *args, **kwargs):  # NEWOBJ / protocol-0 INST may pass arguments; ignore them
        self.state = {}

    def __setstate__(self, state=None):  # state=None: BUILD on the class calls cls.__setstate__(state)
        if not isinstance(self, TorchModuleStub):  # BUILD on the class itself: pickle calls cls.__setstate__(state)
            raise UnsafePickleError("refused: BUILD applied to a module class")
        self.state = state if isinstance(state, dict) else {}

    def __repr__(self):
        return f"<stub {self.class_name}>"


_stub_classes: dict = {}


def _module_stub(qualname: str):
    if qualname not in _stub_classes:
        _stub_classes[qualname] = type("Stub_" + qualname.replace(".", "_"), (TorchModuleStub,),
                                       {"class_name": qualname})
    return _stub_classes[qualname]


class EasyDictStub(dict, metaclass=_sp.FrozenMeta):
    """``dnnlib.util.EasyDict`` read as a plain dict (EDM2 snapshots' top level)."""


class Unresolved(metaclass=_sp.FrozenMeta):
    """Placeholder for ``getattr(obj, name)`` (ECT's loss stores a bound method); the attribute is not looked up."""

    def __init__(self, obj, name):
        self.name = str(name) if isinstance(name, str) else "?"

    def __setstate__(self, state=None):  # state=None: BUILD on the class calls cls.__setstate__(state)
        raise UnsafePickleError("refused: BUILD applied to a getattr placeholder")

    def __repr__(self):
        return f"<unresolved getattr {self.name!r}>"


# The legacy (pre-zip) torch.save stream of one storage, as EDM's plain pickles embed it through
# ``torch.storage._load_from_bytes`` (torch/serialization.py ``_legacy_save``): pickle(MAGIC),
# pickle(protocol 1001), pickle(sys_info), pickle(storage with persistent id ('storage', <type>, key,
# location, numel, view)), pickle([key]), then per key an 8-byte little-endian element count and the raw
# bytes. It is parsed here rather than by torch.load, so that the declared count is checked against the
# bytes that are really there *before* anything is allocated.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {"UntypedStorage": torch.uint8, "ByteStorage": torch.uint8, "CharStorage": torch.int8,
                   "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64,
                   "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "BoolStorage": torch.bool}


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


class _LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafePickleError(f"refused: the storage record asks for {module}.{name}; nothing was executed")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage" or not isinstance(pid[1], _StorageType)
                or not isinstance(pid[2], str) or not isinstance(pid[3], str) or not isinstance(pid[4], int)
                or pid[5] is not None):
            raise ConvertError(f"unexpected persistent id in a storage record: {str(pid)[:80]!r}")
        return pid  # placeholder: (typename, type, key, location, numel, view)


def _legacy_storage(b: bytes, what: str):
    f = io.BytesIO(b)
    try:
        if _LegacyUnpickler(f).load() != _LEGACY_MAGIC or _LegacyUnpickler(f).load() != 1001:
            raise ConvertError(f"{what}: not a legacy torch storage record (bad magic or protocol)")
        sys_info = _LegacyUnpickler(f).load()
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise ConvertError(f"{what}: storage record is not little-endian or has no sys_info")
        u = _LegacyUnpickler(f)
        pid = u.load()
        keys = _LegacyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            RecursionError) as e:
        if isinstance(e, UserError):
            raise
        raise ConvertError(f"{what}: damaged storage record ({type(e).__name__}: {e})") from None
    if not isinstance(pid, tuple) or keys != [pid[2]]:
        raise ConvertError(f"{what}: storage record must hold exactly one storage")
    dtype = pid[1].dtype
    head = f.read(8)
    if len(head) != 8:
        raise ConvertError(f"{what}: storage record truncated before its size")
    count = int.from_bytes(head, "little")
    if count != pid[4]:
        raise ConvertError(f"{what}: the storage declares {pid[4]:,} elements in its header and {count:,} in its data")
    elsize = dtype.itemsize
    present = len(b) - f.tell()
    if count * elsize != present:
        raise ConvertError(f"{what}: the storage declares {count:,} elements of {elsize} bytes "
                           f"({count * elsize:,} bytes) but the record holds {present:,} bytes")
    data = torch.frombuffer(bytearray(b[f.tell():]), dtype=torch.uint8) if present else torch.empty(0, dtype=torch.uint8)
    return torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True)


def _load_storage_bytes(b: bytes):
    """``torch.storage._load_from_bytes``: a legacy torch.save blob holding one storage."""
    if not isinstance(b, (bytes, bytearray)):
        raise ConvertError("storage record is not a bytes blob")
    return _legacy_storage(bytes(b), "storage record")


def _check_view(storage, storage_offset, size, stride) -> int:
    """Validate a tensor view against its storage; returns its byte size. Storages never grow (torch's own
    ``set_`` would enlarge a short storage with uninitialised memory) and views never overlap."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise ConvertError(f"tensor record without a storage ({type(storage).__name__})")
    ok_ints = lambda xs: isinstance(xs, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in xs)  # noqa: E731
    if not ok_ints(size) or not ok_ints(stride) or len(size) != len(stride) or len(size) > _sp.MAX_NDIM:
        raise ConvertError(f"tensor record with a bad size/stride: size={str(size)[:60]} stride={str(stride)[:60]}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise ConvertError(f"tensor record with a bad storage offset {storage_offset!r}")
    elsize = storage.dtype.itemsize
    n_storage = storage._untyped_storage.nbytes() // elsize  # (public .size() warns that TypedStorage is deprecated)
    numel = math.prod(size)
    if numel:
        last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= n_storage:
            raise ConvertError(f"tensor record of size {list(size)} (offset {storage_offset}, stride {list(stride)}) "
                               f"reaches element {last:,} of a storage of {n_storage:,} elements; refused "
                               "(its data is not in the file)")
        # non-overlap: with dims sorted by stride, each stride must exceed the span of the smaller ones
        span = 0
        for n, st in sorted(((n, st) for n, st in zip(size, stride) if n > 1), key=lambda p: p[1]):
            if st <= span:
                raise ConvertError(f"tensor record of size {list(size)} with stride {list(stride)} overlaps itself "
                                   "(stride 0 or overlapping view); refused")
            span += (n - 1) * st
    elif storage_offset > n_storage:
        raise ConvertError(f"tensor record with offset {storage_offset} past the end of its storage ({n_storage})")
    return numel * elsize


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    nbytes = _check_view(storage, storage_offset, size, stride)
    budget = _sp.current_budget()
    if budget is not None:
        budget.charge(nbytes, f"tensor of size {list(size)}")
    # Backward hooks are callables: never installed (a real checkpoint has none).
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, torch.Tensor):
        raise ConvertError("parameter record does not hold a tensor")
    return data  # a plain tensor is all the state-dict walker needs


# Allowed functions are handed out as FrozenCallable objects: the BUILD opcode cannot rebind them.
_FROZEN = {("torch._utils", "_rebuild_tensor_v2"): _sp.FrozenCallable(_rebuild_tensor_v2, "_rebuild_tensor_v2"),
           ("torch._utils", "_rebuild_parameter"): _sp.FrozenCallable(_rebuild_parameter, "_rebuild_parameter"),
           ("torch._utils", "_rebuild_parameter_with_state"): _sp.FrozenCallable(_rebuild_parameter,
                                                                                  "_rebuild_parameter_with_state"),
           ("torch.storage", "_load_from_bytes"): _sp.FrozenCallable(_load_storage_bytes, "_load_from_bytes"),
           ("builtins", "getattr"): Unresolved, ("__builtin__", "getattr"): Unresolved}
_NUMPY = _sp.numpy_globals()


def _allowed(module: str, name: str):
    """The allowlist. Returns the object to use for ``module.name`` or None if it is not allowed."""
    if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
        return PersistentObject
    if (module, name) in _FROZEN:
        return _FROZEN[(module, name)]
    if (module, name) in _NUMPY and name != "_reconstruct" and name != "ndarray":
        return _NUMPY[(module, name)]
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module.startswith("torch.nn.modules.") and name[:1].isupper() and name.isidentifier():
        return _module_stub(f"{module}.{name}")
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)  # torch.dtype objects refuse attribute assignment
    if module == "dnnlib.util" and name == "EasyDict":
        return EasyDictStub
    return None


_EDM_NAMESPACES = ("training", "torch_utils", "dnnlib", "metrics", "networks")


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that resolves only the allowlisted globals (and never imports anything else)."""

    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is not None:
            return obj
        qual = f"{module}.{name}"
        if module.split(".")[0] in _EDM_NAMESPACES:
            raise UnsafePickleError(
                f"unknown class {qual!r} in the pickle: sctlib reads EDMPrecond/ECMPrecond + SongUNet (DDPM++) and "
                "EDM2 Precond + UNet snapshots; nothing from the file was executed")
        raise UnsafePickleError(
            f"refused: the pickle asks for {qual!r}, which is not on the allowlist (tensor rebuilders, "
            "OrderedDict, torch.nn module stubs, numpy scalars, set, EasyDict); nothing from the file was executed")


class _PickleModule:
    """What torch.load needs from ``pickle_module``: our Unpickler and a ``load`` that uses it."""

    Unpickler = RestrictedUnpickler
    __name__ = "sctlib_restricted_pickle"

    @staticmethod
    def load(f, **kwargs):
        return RestrictedUnpickler(f, **kwargs).load()


# ------------------------------------------------------------------------------------------------ reading

def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _check_torch_zip(path: Path, size: int) -> None:
    """Before torch opens a zip: no code, no compressed records (torch.save stores; a deflated record is
    a decompression bomb), declared record sizes within the archive's own size."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ConvertError(f"{path} looks like a torch.save zip but cannot be read (truncated?): {e}") from None
    if any("/code/" in i.filename or i.filename.endswith("constants.pkl") for i in infos):
        raise UnsafePickleError(f"{path} is a TorchScript archive (it contains code); refused")
    total = 0
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            raise ConvertError(f"{path}: record {i.filename!r} is compressed (method {i.compress_type}); torch.save "
                               "never compresses, so this is refused (a compressed record can expand without bound)")
        total += i.file_size
        if i.file_size > size or total > size:
            raise ConvertError(f"{path}: record {i.filename!r} declares {i.file_size:,} bytes, more than the "
                               f"archive's {size:,}; refused")


def read_snapshot(path, *, max_bytes: Optional[int] = None) -> tuple:
    """Unpickle ``path`` with the restricted unpickler. Returns (top-level object, container kind).

    Every tensor is checked against the storage bytes really present, and the tensors together may not
    exceed the file's size nor ``max_bytes`` (default :data:`MAX_SNAPSHOT_BYTES`).
    """
    path = Path(path)
    if path.is_dir():
        raise ConvertError(f"snapshot {path} is a directory, expected a .pkl or .pt file")
    if not path.is_file():
        raise FileNotFoundError(f"snapshot not found: {path}")
    size = path.stat().st_size
    budget = _sp.MemoryBudget(str(path), size, cap=MAX_SNAPSHOT_BYTES if max_bytes is None else max_bytes)
    try:
        with _sp.use_budget(budget):
            if _is_zip(path):
                _check_torch_zip(path, size)
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
                except RuntimeError as e:  # torch's zip reader on a damaged file
                    raise ConvertError(f"cannot read {path} as a torch.save archive (truncated or damaged?): {e}") from None
                return obj, "torch-zip"
            with open(path, "rb") as f:
                return RestrictedUnpickler(f).load(), "pickle"
    except UnsafePickleError as e:
        raise UnsafePickleError(_with_path(e, path)) from None
    except _sp.UnsafePickleError as e:
        raise UnsafePickleError(_with_path(e, path)) from None
    except UserError as e:
        raise ConvertError(_with_path(e, path)) from None
    except RecursionError:
        raise ConvertError(f"cannot read {path}: the pickle nests too deeply (crafted file?)") from None
    except MemoryError:
        raise ConvertError(f"cannot read {path}: it asks for more memory than is available (crafted file?)") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, RuntimeError, AssertionError, OverflowError) as e:
        # AssertionError: torch's persistent_load asserts on unexpected persistent ids
        raise ConvertError(f"cannot read {path}: truncated or not a snapshot pickle "
                           f"({type(e).__name__}: {str(e)[:200]})") from None


def _with_path(e: Exception, path: Path) -> str:
    msg = str(e)
    return msg if str(path) in msg else f"{path}: {msg}"


def _state_of(node):
    if isinstance(node, (PersistentObject, TorchModuleStub)):
        return node.state
    return None


def _walk(node, prefix: str, out: dict, _seen: Optional[set] = None) -> None:
    """Append the state dict of a stub module tree: _parameters, persistent _buffers, then _modules."""
    seen = set() if _seen is None else _seen
    where = prefix.rstrip(".") or "<root>"
    st = _state_of(node)
    if st is None:
        raise ConvertError(f"expected a module at {where}, found {type(node).__name__}")
    if id(node) in seen:
        raise ConvertError(f"the module at {where} contains itself (a cycle in the module tree); refused")
    if prefix.count(".") > MAX_DEPTH:
        raise ConvertError(f"module tree deeper than {MAX_DEPTH} levels at {where[:120]}...; refused")
    seen.add(id(node))
    for field in ("_parameters", "_buffers", "_modules"):
        if not isinstance(st.get(field) or {}, dict):
            raise ConvertError(f"{field} of the module at {where} is a {type(st.get(field)).__name__}, expected a dict")
    for k, v in (st.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + str(k)] = v
    nonpersistent = st.get("_non_persistent_buffers_set") or set()
    if not isinstance(nonpersistent, (set, frozenset, list, tuple)):
        raise ConvertError(f"_non_persistent_buffers_set of the module at {where} is not a set")
    for k, v in (st.get("_buffers") or {}).items():
        if v is not None and k not in nonpersistent:
            out[prefix + str(k)] = v
    for k, v in (st.get("_modules") or {}).items():
        if v is not None:
            _walk(v, f"{prefix}{k}.", out, seen)
    seen.discard(id(node))


def _jsonable(x):
    """Constructor kwargs as JSON values (numpy scalars -> Python numbers; anything else -> repr)."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, float)):
        return x if not (isinstance(x, float) and not math.isfinite(x)) else repr(x)
    if hasattr(x, "item") and hasattr(x, "dtype") and getattr(x, "ndim", 1) == 0:
        return _jsonable(x.item())
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    return repr(x)


# Settings of the published networks that sctlib implements; anything else is refused by name.
_SONGUNET_FIXED = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
                   "channel_mult_noise": 1, "resample_filter": [1, 1], "channel_mult_emb": 4}
_EDM2_FIXED = {"channels_per_head": 64, "label_balance": 0.5, "concat_balance": 0.5, "res_balance": 0.3,
               "attn_balance": 0.3, "clip_act": 256, "resample_filter": [1, 1], "channel_mult_noise": None,
               "channel_mult_emb": None}
_EXTRA_KEYS = ("model.map_augment.weight", "logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight")


def _check_fixed(kwargs: dict, fixed: dict, what: str) -> None:
    for k, want in fixed.items():
        if k in kwargs and _jsonable(kwargs[k]) != want:
            raise ConvertError(f"unsupported {what} setting {k}={kwargs[k]!r}; sctlib implements {k}={want!r}")


def _levels(sd: dict, prefix: str, conv_key_suffix: str):
    """Resolutions (descending), blocks per level and attention resolutions, from the encoder key names."""
    enc = [k[len(prefix) + 4:] for k in sd if k.startswith(prefix + "enc.")]
    res_blocks: dict = {}
    for k in enc:
        name = k.split(".")[0]  # e.g. 16x16_block3
        r, _, rest = name.partition("_")
        if rest.startswith("block"):
            res_blocks.setdefault(int(r.split("x")[0]), set()).add(int(rest[5:]))
    if not res_blocks:
        raise ConvertError("no encoder blocks found in the state dict")
    resolutions = sorted(res_blocks, reverse=True)
    nb = {len(v) for v in res_blocks.values()}
    if len(nb) != 1:
        raise ConvertError(f"uneven number of blocks per level: {res_blocks}")
    attn = sorted((r for r in resolutions if f"{prefix}enc.{r}x{r}_block0.{conv_key_suffix}" in sd), reverse=True)
    return resolutions, nb.pop(), attn


def _infer_config(sd: dict, kind: str, init_kwargs: dict) -> NetConfig:
    if kind == "ddpmpp":
        convs = [k for k in sd if k.startswith("model.enc.") and k.endswith("_conv.weight")]
        if len(convs) != 1:
            raise ConvertError("DDPM++ state dict without a unique model.enc.<R>x<R>_conv.weight")
        R = int(convs[0].split(".")[2].split("x")[0])
        mc, img_channels = sd[convs[0]].shape[:2]
        resolutions, num_blocks, attn = _levels(sd, "model.", "qkv.weight")
        mult = tuple(int(sd[f"model.enc.{r}x{r}_block0.conv0.weight"].shape[0]) // int(mc) for r in resolutions)
        label_dim = int(sd["model.map_label.weight"].shape[1]) if "model.map_label.weight" in sd else 0
        dropout = float(init_kwargs.get("dropout", 0.10))  # SongUNet's default
        return NetConfig(arch="ddpmpp", img_resolution=R, img_channels=int(img_channels), label_dim=label_dim,
                         model_channels=int(mc), channel_mult=mult, num_blocks=num_blocks,
                         attn_resolutions=tuple(attn), dropout=dropout, dropout_res=0,
                         sigma_data=float(init_kwargs.get("sigma_data", 0.5)), boundary="never")
    convs = [k for k in sd if k.startswith("unet.enc.") and k.endswith("_conv.weight")]
    if len(convs) != 1:
        raise ConvertError("EDM2 state dict without a unique unet.enc.<R>x<R>_conv.weight")
    R = int(convs[0].split(".")[2].split("x")[0])
    mc, cin = sd[convs[0]].shape[:2]
    resolutions, num_blocks, attn = _levels(sd, "unet.", "attn_qkv.weight")
    mult = tuple(int(sd[f"unet.enc.{r}x{r}_block0.conv_res1.weight"].shape[0]) // int(mc) for r in resolutions)
    label_dim = int(sd["unet.emb_label.weight"].shape[1]) if "unet.emb_label.weight" in sd else 0
    dropout_res = int(init_kwargs.get("dropout_res", init_kwargs.get("dropres", 0)) or 0)
    return NetConfig(arch="edm2", img_resolution=R, img_channels=int(cin) - 1, label_dim=label_dim,
                     model_channels=int(mc), channel_mult=mult, num_blocks=num_blocks, attn_resolutions=tuple(attn),
                     dropout=float(init_kwargs.get("dropout", 0.0)), dropout_res=dropout_res,
                     sigma_data=float(init_kwargs.get("sigma_data", 0.5)), boundary="never")


def _pick(top, container: str, which: str):
    """Choose the network (or EMA state dict) to convert. Returns (node_or_state_dict, which, available)."""
    if isinstance(top, (PersistentObject, TorchModuleStub)):
        top = {"ema": top}
    if not isinstance(top, dict):
        raise ConvertError(f"unexpected snapshot structure: top level is {type(top).__name__}, expected a dict")
    choices: dict = {}
    if top.get("ema") is not None:
        choices["ema"] = top["ema"]
    if top.get("net") is not None:
        choices["net"] = top["net"]
    ema_state = top.get("ema_state")
    if isinstance(ema_state, dict) and isinstance(ema_state.get("emas"), (list, tuple)):
        for i, sd in enumerate(ema_state["emas"]):
            choices[f"ema_{i}"] = sd
    if isinstance(top.get("online_ema_state"), dict):
        choices["online_ema"] = top["online_ema_state"]
    if not choices:
        raise ConvertError(f"no network in the snapshot: top-level keys are {sorted(map(str, top))}; expected "
                           "'ema' (EDM/EDM2/ECT .pkl) or 'net' (ECT .pt)")
    if which == "auto":
        which = "ema" if "ema" in choices else "net"
    if which not in choices:
        raise ConvertError(f"which={which!r} is not in this snapshot; available: {', '.join(choices)}")
    return choices[which], which, list(choices), top


def state_dict_from_pickle(path, which: str = "auto"):
    """Read a snapshot and return (state_dict, info) with keys exactly as in the published network.

    ``which``: ``'auto'`` (the ``ema`` network of a .pkl, the live ``net`` of a .pt), ``'ema'``, ``'net'``,
    ``'online_ema'`` or ``'ema_<i>'`` (ECT ImageNet power-function EMAs; their sigma_rel values are in
    ``info['phema_stds']``). Tensors keep their stored dtype (EDM2: float16). ``info`` also lists
    ``extra_keys`` (present in the file, not part of sctlib's networks: ``map_augment``, ``logvar_*``).
    """
    path = Path(path)
    top, container = read_snapshot(path)
    try:
        return _state_dict_from_top(path, top, container, which)
    except ConvertError as e:  # name the file in every message
        if str(path) in str(e):
            raise
        raise type(e)(_with_path(e, path)) from None
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
        raise ConvertError(f"{path}: unexpected snapshot structure ({type(e).__name__}: {str(e)[:200]})") from None


def _state_dict_from_top(path: Path, top, container: str, which: str):
    chosen, which, available, top = _pick(top, container, which)
    # the architecture always comes from a module object (a .pt's EMA entries are bare state dicts)
    module = chosen if isinstance(chosen, (PersistentObject, TorchModuleStub)) else (top.get("net") or top.get("ema"))
    if not isinstance(module, (PersistentObject, TorchModuleStub)):
        raise ConvertError("the snapshot holds no network object to read the architecture from")
    class_name = getattr(module, "class_name", "?")
    raw_kwargs = module.state.get("_init_kwargs") or {}
    if not isinstance(raw_kwargs, dict) or not all(isinstance(k, str) for k in raw_kwargs):
        raise ConvertError(f"{path}: _init_kwargs of {class_name} is a {type(raw_kwargs).__name__}, expected a dict "
                           "of keyword arguments")
    init_kwargs = dict(raw_kwargs)
    if not isinstance(module.state.get("_modules") or {}, dict):
        raise ConvertError(f"{path}: _modules of {class_name} is not a dict")
    inner_names = [k for k, v in (module.state.get("_modules") or {}).items() if v is not None]
    if "model" in inner_names:
        arch = "ddpmpp"
        inner = module.state["_modules"]["model"]
        model_type = init_kwargs.get("model_type", getattr(inner, "class_name", "SongUNet"))
        if model_type != "SongUNet":
            raise ConvertError(f"unsupported network {model_type!r} in {class_name}; sctlib implements SongUNet "
                               "(DDPM++) and the EDM2 UNet")
        _check_fixed(init_kwargs, _SONGUNET_FIXED, "SongUNet")
    elif "unet" in inner_names:
        arch = "edm2"
        _check_fixed(init_kwargs, _EDM2_FIXED, "EDM2 UNet")
    else:
        raise ConvertError(f"{class_name} has no 'model' (EDM/ECT) or 'unet' (EDM2) sub-network; found {inner_names}")

    if isinstance(chosen, dict) and not isinstance(chosen, EasyDictStub):
        sd = collections.OrderedDict((k, v) for k, v in chosen.items())
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ConvertError(f"EMA state dict {which!r} has non-tensor entries: {bad[:5]}")
    else:
        sd = collections.OrderedDict()
        _walk(chosen, "", sd)
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ConvertError(f"state entries that are not tensors: {bad[:5]}")

    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    sigma_min = init_kwargs.get("sigma_min")
    if class_name == "ECMPrecond":
        source, src_boundary = "ect", "eval"
    elif class_name == "EDMPrecond":
        source, src_boundary = "edm", "never"
    elif arch == "edm2":
        source = "edm2" if any(k.startswith("logvar_") for k in sd) else "ect-edm2"
        src_boundary = "never"
    else:
        source, src_boundary = class_name, "never"
    stds = (top.get("ema_state") or {}).get("stds") if isinstance(top.get("ema_state"), dict) else None
    info = {
        "path": str(path), "container": container, "source": source, "class_name": class_name,
        "inner_class": getattr((module.state.get("_modules") or {}).get(inner_names[0]), "class_name", None),
        "arch": arch, "which": which, "available": available, "dtypes": dtypes,
        "init_kwargs": _jsonable(init_kwargs),
        "source_boundary": src_boundary, "source_sigma_min": None if sigma_min is None else float(sigma_min),
        "phema_stds": _jsonable(stds) if stds is not None else None,
        "extra_keys": [k for k in sd if k in _EXTRA_KEYS],
    }
    info["net_config"] = to_dict(_infer_config(sd, arch, init_kwargs))
    if src_boundary == "eval" and sigma_min:
        info["net_config"]["sigma_min"] = float(sigma_min)
    return sd, info


def load_edm_pickle(path, which: str = "auto", map_location="cpu"):
    """Load an EDM / EDM2 / ECT snapshot as an sctlib network, running no code from the file.

    Returns ``(model, info)``. ``model`` is a :class:`sctlib.precond.Precond` in eval mode with
    ``boundary='never'``: ``model(x, sigma, class_labels)`` is the plain EDM denoiser D(x; sigma)
    (EDM Eq. 7, Table 1), which equals EDM's ``EDMPrecond``, ECT's ``ECMPrecond`` in its training form
    (dropout off) and EDM2's ``Precond`` without the log-variance head. Weights are float32 (EDM2's
    float16 weights are upcast). ``info`` has ``net_config`` (a NetConfig dict, boundary 'never'),
    ``source`` ('edm' | 'ect' | 'edm2' | 'ect-edm2'), ``source_boundary`` (ECT CIFAR: 'eval', with
    ``source_sigma_min`` 0.003: set ``boundary='eval'`` to reproduce its evaluation wrapper),
    ``dropped_keys`` (e.g. ``model.map_augment.weight``, ``logvar_*``; EDM only adds map_augment when
    augmentation labels are passed, which sampling never does) and the ``which`` / ``available`` choice
    (see :func:`state_dict_from_pickle`).
    """
    from .networks import build_network

    sd, info = state_dict_from_pickle(path, which=which)
    dropped = [k for k in sd if k in _EXTRA_KEYS]
    for k in dropped:
        sd.pop(k)
    info["dropped_keys"] = dropped
    cfg = NetConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in info["net_config"].items()})
    with torch.device("meta"):
        model = build_network(cfg)
    model = model.to_empty(device=map_location)
    try:
        _strict_load(model, {k: v.to(map_location) for k, v in sd.items()}, str(path))
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    info["num_params"] = sum(p.numel() for p in model.parameters())
    return model.eval(), info


def _made_dirs(folder: Path) -> list:
    """Create ``folder`` (and parents); return the ones created, deepest first, to remove on failure."""
    made = []
    p = folder
    while not p.exists():
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def convert(src, dst_dir, *, which: str = "auto", name: str = "model") -> dict:
    """Convert ``src`` into ``dst_dir/<name>.safetensors`` + ``.json``; nothing is left behind on failure."""
    src, dst_dir = Path(src), Path(dst_dir)
    if not src.exists():
        raise FileNotFoundError(f"snapshot not found: {src}")
    if dst_dir.exists() and not dst_dir.is_dir():
        raise ConvertError(f"destination {dst_dir} is a file; give a folder for model.safetensors + model.json")
    if dst_dir.resolve() == src.resolve() or src.resolve() in (dst_dir.resolve() / f"{name}.safetensors",
                                                               dst_dir.resolve() / f"{name}.json"):
        raise ConvertError(f"destination {dst_dir} would overwrite the source {src}")
    anc = dst_dir  # the destination is checked before the (possibly long) conversion runs
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConvertError(f"destination {dst_dir}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK):
        raise PermissionError(13, "destination folder is not writable", str(anc))
    model, info = load_edm_pickle(src, which=which)
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    meta = {"converted_from": str(src.resolve()), "source_sha256": h.hexdigest(),
            "source": info["source"], "class_name": info["class_name"], "which": info["which"],
            "ema": info["which"], "dropped_keys": info["dropped_keys"], "source_dtypes": info["dtypes"],
            "source_boundary": info["source_boundary"], "source_sigma_min": info["source_sigma_min"],
            "init_kwargs": info["init_kwargs"], "git_sha": git_sha()}
    made = _made_dirs(dst_dir)
    st_path, json_path = dst_dir / f"{name}.safetensors", dst_dir / f"{name}.json"
    existed = {p: p.exists() for p in (st_path, json_path)}
    try:
        if not os.access(dst_dir, os.W_OK):
            raise PermissionError(13, "destination folder is not writable", str(dst_dir))
        info["out"] = save_model(dst_dir / name, model, net_config=info["net_config"], meta=meta)
    except BaseException:
        for p, was in existed.items():
            if not was:
                p.unlink(missing_ok=True)
        for d in made:
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sctlib.convert",
                                     description="Convert an EDM/EDM2/ECT .pkl or ECT .pt into sctlib's inert "
                                                 "format (DST_DIR/model.safetensors + model.json). No code from "
                                                 "the source file is executed.")
    parser.add_argument("src", help="EDM/EDM2/ECT network-snapshot .pkl or ECT training-state .pt")
    parser.add_argument("dst_dir", help="output folder")
    parser.add_argument("--which", default="auto", help="'auto', 'ema', 'net', 'online_ema' or 'ema_<i>'")
    parser.add_argument("--name", default="model", help="output file stem (default: model)")
    args = parser.parse_args(argv)
    return cli_main(lambda: _main(args))


def _main(args) -> int:
    info = convert(args.src, args.dst_dir, which=args.which, name=args.name)
    out = info["out"]
    cfg = info["net_config"]
    print(f"converted {args.src} ({info['source']}, {info['class_name']}, which={info['which']}, "
          f"stored {'/'.join(info['dtypes'])})")
    print(f"  arch={cfg['arch']} res={cfg['img_resolution']} channels={cfg['model_channels']} "
          f"mult={cfg['channel_mult']} blocks={cfg['num_blocks']} attn={cfg['attn_resolutions']} "
          f"label_dim={cfg['label_dim']} dropout={cfg['dropout']}")
    print(f"  {info['num_params']:,} parameters; dropped keys: {info['dropped_keys'] or 'none'}; "
          f"available: {', '.join(info['available'])}")
    print(f"  wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
