"""Inert checkpoints: safetensors for tensors, JSON for everything else. Loading never unpickles.

Two formats:

* a *tree* file (:func:`save_tree` / :func:`load_tree`): one ``.safetensors`` file holding any nested
  dict / list / tuple of tensors, numbers, strings, bools and None - an optimizer state_dict, RNG
  states as uint8 tensors, a sampler position. Tensors are stored under flattened path keys
  (``state/0/exp_avg``); the non-tensor skeleton and ``meta`` are JSON strings in the safetensors
  header metadata.
* a *model* pair (:func:`save_model` / :func:`load_model`): ``X.safetensors`` (the state dict) and
  ``X.json`` (the :class:`~sctlib.config.NetConfig` as a dict plus metadata such as the git SHA, images
  seen and EMA kind). :func:`load_model` rebuilds the network with
  :func:`sctlib.networks.build_network` and loads the weights strictly.

Every file is written atomically: a temporary file in the destination folder, fsync, ``os.replace``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError

__all__ = ["save_tree", "load_tree", "read_tree_meta", "save_model", "load_model", "model_paths", "git_sha",
           "CheckpointError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_TREE_KEY, _META_KEY, _KIND_KEY = "sctlib.tree", "sctlib.meta", "sctlib.kind"

PathLike = Union[str, os.PathLike]


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, malformed, or does not fit the network it is loaded into."""


# ------------------------------------------------------------------------------------------------ atomic IO

def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable (not supported on every platform / file system)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it over ``path``; never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:  # disk full, quota, I/O error: name the file being written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        except Exception as e:
            if type(e).__name__ != "SafetensorError":  # safetensors reports its I/O errors with its own type
                raise
            raise OSError(getattr(e, "errno", None) or 5, f"cannot write ({e})", str(path)) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_text_atomic(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write(path, write)


def _save_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    # safetensors needs contiguous CPU tensors that share no memory
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _read_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------ trees

def _encode(obj: Any, path: str, tensors: dict):
    """Skeleton JSON for ``obj``; tensors go to ``tensors`` under their path key."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:  # dict keys containing '/' could collide; keep every key unique
            key += "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}  # strict JSON has no inf / nan
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise TypeError(f"save_tree: dict key {k!r} at {path or '<root>'} is not a str/int/float/bool/None")
            items.append([k, _encode(v, f"{path}/{k}" if path else str(k), tensors)])
        return {"__dict__": items}  # a list of pairs keeps int keys ints and the order
    if isinstance(obj, (list, tuple)):
        enc = [_encode(v, f"{path}/{i}" if path else str(i), tensors) for i, v in enumerate(obj)]
        return enc if isinstance(obj, list) else {"__tuple__": enc}
    raise TypeError(f"save_tree: cannot store {type(obj).__name__} at {path or '<root>'}; allowed: tensors, "
                    "dict, list, tuple, int, float, str, bool, None")


def _decode(obj: Any, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        raise CheckpointError(f"unknown node in the tree skeleton: {sorted(obj)}")
    return obj


def save_tree(path: PathLike, tree: Any, *, meta: Optional[dict] = None) -> Path:
    """Store a nested structure of tensors and plain values in ONE .safetensors file, atomically.

    Tensors are stored detached, on the CPU, contiguous (dtype preserved; 0-d and empty tensors work).
    ``meta`` must be JSON-serialisable. Returns the path written.
    """
    path = Path(path)
    tensors: dict = {}
    skeleton = _encode(tree, "", tensors)
    metadata = {"format": "pt", _KIND_KEY: "tree", _TREE_KEY: json.dumps(skeleton),
                _META_KEY: json.dumps(meta or {})}
    _save_tensors(path, tensors, metadata)
    return path


def load_tree(path: PathLike, map_location: Union[str, torch.device] = "cpu", *, return_meta: bool = False):
    """Inverse of :func:`save_tree` (tuples stay tuples, int dict keys stay ints). No code is executed."""
    path = Path(path)
    _check_file(path, "tree checkpoint")
    md = _read_metadata(path)
    if _TREE_KEY not in md:
        raise CheckpointError(f"{path} is a safetensors file but not a save_tree file (no {_TREE_KEY!r} metadata)")
    tensors = load_file(str(path), device=str(map_location))
    tree = _decode(json.loads(md[_TREE_KEY]), tensors)
    return (tree, json.loads(md.get(_META_KEY, "{}"))) if return_meta else tree


def read_tree_meta(path: PathLike) -> dict:
    """The ``meta`` dict of a tree file, without loading its tensors."""
    md = _read_metadata(Path(path))
    return json.loads(md.get(_META_KEY, "{}"))


# ------------------------------------------------------------------------------------------------ models

def model_paths(path: PathLike) -> Tuple[Path, Path]:
    """(X.safetensors, X.json) for ``X``, ``X.safetensors`` or ``X.json``."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_model(path: PathLike, model_or_state_dict, *, net_config: dict, meta: Optional[dict] = None) -> Path:
    """Write ``X.safetensors`` (state dict) and ``X.json`` ({format, net_config, meta}) atomically.

    ``net_config`` is a NetConfig (or its dict); ``meta`` may carry e.g. ``git_sha``, ``nimg``, ``ema``.
    The weights are written first and the JSON last, so an existing JSON always describes complete
    weights. Returns the .safetensors path.
    """
    from .config import NetConfig, to_dict  # local: config is pure data, no import cycle

    if isinstance(net_config, NetConfig):
        net_config = to_dict(net_config)
    if not isinstance(net_config, dict):
        raise TypeError(f"net_config must be a NetConfig or dict, got {type(net_config).__name__}")
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TypeError("save_model needs an nn.Module or a state dict of tensors")
    info = {"format": "sctlib-model", "version": FORMAT_VERSION, "net_config": net_config, "meta": meta or {}}
    text = json.dumps(info, indent=2, sort_keys=False)
    st_path, json_path = model_paths(path)
    _save_tensors(st_path, sd, {"format": "pt", _KIND_KEY: "model", "sctlib.info": text})
    _write_text_atomic(json_path, text + "\n")
    return st_path


def _strict_load(model: torch.nn.Module, sd: dict, where: str) -> None:
    """load_state_dict(strict) with one message naming missing / unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def head(xs):
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {head(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {head(shapes)}")
        raise CheckpointError(f"weights in {where} do not fit the network: " + "; ".join(parts))
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu"):
    """Rebuild the network from ``X.json`` and load ``X.safetensors`` strictly. Returns (model, info).

    ``model`` is a :class:`sctlib.precond.Precond` in eval mode on ``map_location``; ``info`` is the JSON
    content ({format, version, net_config, meta}).
    """
    from .config import NetConfig, from_dict
    from .networks import build_network

    st_path, json_path = model_paths(path)
    _check_file(json_path, "model config (.json)")
    _check_file(st_path, "model weights (.safetensors)")
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != "sctlib-model" or "net_config" not in info:
        raise CheckpointError(f"{json_path} is not an sctlib model file (expected format 'sctlib-model')")
    if int(info.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{json_path} has format version {info['version']}; this sctlib reads <= {FORMAT_VERSION}")
    cfg = from_dict(NetConfig, info["net_config"])
    with torch.device("meta"):  # shapes only; real storage comes from the file (no double allocation)
        model = build_network(cfg)
    md = _read_metadata(st_path)  # clear error for truncated / foreign files before loading
    # The .safetensors embeds the JSON it was written with: a pair torn by a kill between the two writes
    # (new weights beside an older .json, or the reverse) is refused instead of loaded with the wrong config.
    embedded = md.get("sctlib.info")
    if embedded is not None:
        try:
            same = json.loads(embedded) == info
        except json.JSONDecodeError:
            same = False
        if not same:
            raise CheckpointError(f"{st_path} and {json_path} do not belong together (a write was interrupted "
                                  "between them); re-run the command that wrote them")
    sd = load_file(str(st_path), device=str(map_location))
    model = model.to_empty(device=map_location)
    _strict_load(model, sd, str(st_path))
    return model.eval(), info


def git_sha(path: Optional[PathLike] = None) -> Optional[str]:
    """HEAD commit of the git repository containing ``path`` (default: this package), or None."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None
