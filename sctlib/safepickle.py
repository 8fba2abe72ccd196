"""Building blocks for restricted unpicklers that are safe against memory exhaustion and class tampering.

A restricted :class:`pickle.Unpickler` (``find_class`` with an allowlist) stops code execution, but three
other attacks remain with allowed globals alone (all seen in practice, see the tests in
``tests/test_hostile.py``):

* **declared sizes**: ``numpy.dtype('V1073741824')`` passed to numpy's scalar constructor allocates a GiB
  from a 110-byte file; ``numpy._reconstruct`` allocates whatever shape it is given; a tensor view larger
  than its storage makes torch *grow* the storage (the new part is uninitialised memory); stride-0 views
  turn one stored element into gigabytes once materialised. Every size is therefore checked against the
  bytes actually present in the file and against a cap (:class:`MemoryBudget`).
* **BUILD on an allowed class**: the BUILD opcode ``setattr``-s arbitrary attributes on the object on the
  stack, which may be an allowed *class* or *function*; on a Python class that rebinds its methods for the
  rest of the process. Allowed Python objects are therefore instances of :class:`FrozenCallable` or
  classes with the :class:`FrozenMeta` metaclass, both of which refuse attribute assignment.
* **structure bombs**: self-referential containers and deep nesting are refused by the readers
  (recursion depth), not here.
"""
from __future__ import annotations

import codecs
import contextvars
import math
from typing import Callable, Optional

from .errors import UserError

__all__ = ["UnsafePickleError", "PickleBudgetError", "FrozenMeta", "FrozenCallable", "MemoryBudget",
           "current_budget", "numpy_globals", "MAX_SCALAR_BYTES", "MAX_SET_ITEMS"]

MAX_SCALAR_BYTES = 16        # the largest numpy scalar a checkpoint needs: complex128
MAX_SET_ITEMS = 100_000      # sets in checkpoints hold buffer names
MAX_NDIM = 64


class UnsafePickleError(UserError, ValueError):
    """The pickle asks for something outside the allowlist, or tampers with it. Nothing was executed."""


class PickleBudgetError(UserError, ValueError):
    """A declared size exceeds the bytes present in the file or the memory cap."""


class FrozenMeta(type):
    """Metaclass of the classes an unpickler hands out: BUILD (setattr on the class) is refused."""

    def __setattr__(cls, name, value):
        raise UnsafePickleError(f"refused: the pickle tries to set {name!r} on the allowed class {cls.__name__} "
                                "(BUILD on a class); nothing from the file was executed")

    def __delattr__(cls, name):
        raise UnsafePickleError(f"refused: the pickle tries to delete {name!r} from {cls.__name__}")


class FrozenCallable(metaclass=FrozenMeta):
    """An allowed function as an object that refuses BUILD (``__setstate__``) and attribute assignment."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable, name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __setattr__(self, name, value):
        raise UnsafePickleError(f"refused: the pickle tries to set {name!r} on {self._name} (BUILD on a function)")

    def __setstate__(self, state):
        raise UnsafePickleError(f"refused: the pickle applies BUILD to {self._name}")

    def __repr__(self):
        return f"<allowed {self._name}>"


# ------------------------------------------------------------------------------------------------ budget

class MemoryBudget:
    """Bytes a reader may materialise: at most what the file holds (plus ``slack``) and at most ``cap``.

    ``charge(n, what)`` raises :class:`PickleBudgetError` naming ``source`` and the record ``what``.
    """

    def __init__(self, source: str, file_bytes: int, *, cap: int, slack: int = 1 << 20):
        self.source = source
        self.limit = min(int(file_bytes) + int(slack), int(cap))
        self.cap = int(cap)
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        nbytes = int(nbytes)
        if nbytes < 0:
            raise PickleBudgetError(f"{self.source}: {what} declares a negative size")
        if self.used + nbytes > self.limit:
            raise PickleBudgetError(
                f"{self.source}: {what} declares {nbytes:,} bytes, which with the {self.used:,} already read exceeds "
                f"what the file can hold ({self.limit:,} bytes; cap {self.cap:,}); refused (crafted or damaged file)")
        self.used += nbytes


_BUDGET: contextvars.ContextVar = contextvars.ContextVar("sctlib_pickle_budget", default=None)


def current_budget() -> Optional[MemoryBudget]:
    return _BUDGET.get()


class use_budget:
    """Context manager: make ``budget`` the one the guards below charge."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget

    def __enter__(self):
        self._tok = _BUDGET.set(self.budget)
        return self.budget

    def __exit__(self, *exc):
        _BUDGET.reset(self._tok)


def _charge(nbytes: int, what: str) -> None:
    b = _BUDGET.get()
    if b is None:  # a guard used outside a reader: apply a conservative fixed cap
        if nbytes > (64 << 20):
            raise PickleBudgetError(f"{what} declares {nbytes:,} bytes; refused")
        return
    b.charge(nbytes, what)


# ------------------------------------------------------------------------------------------------ numpy

def _np():
    import numpy

    return numpy


def _check_dtype(dt, what: str):
    np = _np()
    if not isinstance(dt, np.dtype):
        raise UnsafePickleError(f"{what}: expected a numpy dtype, got {type(dt).__name__}")
    # numeric kinds only: void ('V<n>') dtypes carry an arbitrary item size, object dtypes pickled lists
    if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None or dt.hasobject:
        raise UnsafePickleError(f"{what}: numpy dtype {dt!r} refused (only plain numeric dtypes are allowed)")
    if dt.itemsize > MAX_SCALAR_BYTES:
        raise UnsafePickleError(f"{what}: numpy dtype {dt!r} has item size {dt.itemsize}; refused")
    return dt


def _safe_dtype(obj, align=False, copy=False):
    np = _np()
    if not isinstance(obj, (str, bytes)):
        raise UnsafePickleError(f"numpy.dtype({obj!r}) refused: only dtype names are allowed")
    return _check_dtype(np.dtype(obj, align, copy), "numpy.dtype")


def _safe_scalar(dtype, data=None):
    _check_dtype(dtype, "numpy scalar")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise PickleBudgetError(f"numpy scalar of {dtype!r}: expected {dtype.itemsize} bytes of data, got "
                                f"{len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__}")
    np = _np()
    return np.frombuffer(data, dtype=dtype)[0]


def _safe_reconstruct(subtype, shape, dtype):
    """numpy's array-pickle constructor: allocates ``shape`` of ``dtype``; numpy itself always passes (0,)."""
    np = _np()
    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r} refused: only numpy.ndarray is allowed")
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise UnsafePickleError(f"numpy _reconstruct: bad shape {shape!r}")
    if math.prod(shape) > 0:
        raise PickleBudgetError(f"numpy _reconstruct with shape {shape}: numpy writes (0,) and fills the array "
                                "from the data in the file; refused")
    if isinstance(dtype, (str, bytes)):
        dtype = np.dtype(dtype)
    _check_dtype(dtype, "numpy _reconstruct")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _safe_encode(obj, encoding="utf-8", errors="strict"):
    # protocol-2 pickles spell bytes literals as _codecs.encode(str, 'latin1'); nothing else is needed
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r} refused (only the latin1 bytes idiom is allowed)")
    return codecs.encode(obj, "latin1")


def _safe_set(items=(), frozen=False):
    if not isinstance(items, (list, tuple, set, frozenset)) or len(items) > MAX_SET_ITEMS:
        raise UnsafePickleError(f"set() of {type(items).__name__} refused: a checkpoint's sets hold a list of names")
    if not all(isinstance(x, (str, int, float, bool, bytes, type(None))) for x in items):
        raise UnsafePickleError("set() of non-scalar items refused: a checkpoint's sets hold names")
    return frozenset(items) if frozen else set(items)


def _refuse_ndarray(*args, **kwargs):
    raise UnsafePickleError("calling numpy.ndarray(...) from a pickle is refused (it allocates any declared shape)")


# numpy.ndarray as the pickle names it: only a marker for _reconstruct, never called (ndarray(shape) allocates)
_NDARRAY = FrozenCallable(_refuse_ndarray, "numpy.ndarray")


def numpy_globals() -> dict:
    """(module, name) -> guarded object for numpy arrays, scalars and dtypes, the bytes idiom and sets."""
    scalar = FrozenCallable(_safe_scalar, "numpy scalar")
    recon = FrozenCallable(_safe_reconstruct, "numpy _reconstruct")
    out = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "scalar")] = scalar
        out[(mod, "_reconstruct")] = recon
    out[("numpy", "dtype")] = FrozenCallable(_safe_dtype, "numpy.dtype")
    out[("numpy", "ndarray")] = _NDARRAY
    out[("_codecs", "encode")] = FrozenCallable(_safe_encode, "_codecs.encode")
    out[("builtins", "set")] = out[("__builtin__", "set")] = FrozenCallable(_safe_set, "set")
    out[("builtins", "frozenset")] = out[("__builtin__", "frozenset")] = FrozenCallable(
        lambda items=(): _safe_set(items, frozen=True), "frozenset")
    return out
