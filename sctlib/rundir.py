"""One run per directory: the lock, the resume-time config comparison, the run history and log clean-up.

A run directory (``--run-dir``) holds exactly one run. This module keeps it that way:

* :class:`RunLock` - ``run.lock`` (JSON: host, pid, the pid's start time) created with ``O_EXCL``; a
  second process is refused with a message naming the owner. A lock whose owner is gone (same host, pid
  not running or reused) is stale and taken over; a lock from another host is never guessed at.
* :func:`compare_configs` - the config stored *in the checkpoint* is compared with the requested one before
  any tensor is loaded. Keys in ``resumable`` (run length, logging, devices) may change freely; any other
  change is refused unless the user asks for it explicitly (``--change-config``), and then it is written
  to ``history.jsonl`` with the old and new values. Network-shape keys can never change on resume.
* :func:`clean_stale_tmp` removes temporary files of writers killed mid-write (``.<name>.*.tmp``);
  :func:`truncate_jsonl` drops log lines beyond the resumed image count so replayed ticks are not repeated.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

from .errors import UserError

__all__ = ["RunDirError", "RunLock", "flatten", "compare_configs", "clean_stale_tmp", "truncate_jsonl",
           "append_history", "SHAPE_KEYS", "LOCK_NAME"]

LOCK_NAME = "run.lock"
# Network settings that fix tensor shapes: a checkpoint cannot be loaded into a network that differs here.
SHAPE_KEYS = ("net.arch", "net.img_resolution", "net.img_channels", "net.label_dim", "net.model_channels",
              "net.channel_mult", "net.num_blocks", "net.attn_resolutions", "phema_stds")


class RunDirError(UserError):
    """The run directory cannot be used as asked (locked, another run's config, not a directory)."""


# ------------------------------------------------------------------------------------------------ lock

def _proc_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), to detect a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class RunLock:
    """``with RunLock(run_dir):`` - exclusive use of ``run_dir`` by this process."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def _record(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": _proc_start(pid), "time": time.time()}

    def _owner(self) -> Optional[dict]:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as held by an unknown owner, then as stale

    def _stale(self, owner: dict) -> bool:
        if not owner:
            # an empty lock is a creator killed between open and write; wait a moment before calling it stale
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except OSError:
                return True
        if owner.get("host") != socket.gethostname():
            return False
        pid = owner.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return True
        start = owner.get("pid_start")
        return start is not None and _proc_start(pid) not in (None, start)

    def acquire(self) -> "RunLock":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run directory {self.run_dir} is a file; give a folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                if not self._stale(owner):
                    who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "an unknown process"
                    raise RunDirError(
                        f"run directory {self.run_dir} is in use by {who} (lock {self.path}); wait for it to finish, "
                        f"use another --run-dir, or delete the lock if that process is gone") from None
                # stale: move it aside atomically (only one contender wins the rename), then retry
                aside = self.path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}.tmp")
                try:
                    os.rename(self.path, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._record()))
            self.held = True
            return self
        raise RunDirError(f"could not take the lock {self.path} (contended); try again")

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------ configs

def flatten(d: dict, prefix: str = "") -> Dict[str, object]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1} (lists kept as values)."""
    out: Dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_configs(old: dict, new: dict, *, resumable: Iterable[str], allow_change: bool,
                    where: str, defaults: Optional[dict] = None) -> Dict[str, Tuple[object, object]]:
    """Changed keys (dotted) between the stored and the requested config, excluding ``resumable`` ones.

    A key the stored config lacks (a setting added to sctlib after the run started) counts as unchanged
    when the requested value is the current default (``defaults``); a key only the stored config has (a
    setting since removed) is ignored. Raises :class:`RunDirError` if something changed and
    ``allow_change`` is False, or if a network-shape key changed (never loadable). Returns
    ``{key: (old, new)}``.
    """
    resumable = set(resumable)
    fo, fn = flatten(old), flatten(new)
    fd = flatten(defaults or {})
    missing = object()

    def changed(k):
        if k not in fn:
            return False
        before = fo.get(k, fd.get(k, missing))
        return before != fn[k]

    diff = {k: (fo.get(k), fn.get(k)) for k in sorted(fn)
            if changed(k) and k.split(".")[0] not in resumable and k not in resumable}
    if not diff:
        return diff
    show = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6]) + (" ..." if len(diff) > 6 else "")
    shape = [k for k in diff if k in SHAPE_KEYS]
    if shape:
        raise RunDirError(f"{where} holds a run with a different network ({show}); the weights cannot be loaded into "
                          f"it: use a new --run-dir")
    if not allow_change:
        raise RunDirError(f"{where} holds a run with a different config ({show}); resume with the same settings, use "
                          f"a new --run-dir, or add --change-config to continue this run with the new settings")
    return diff


def append_history(run_dir, event: dict) -> None:
    """Append one event (resume, config change) to ``history.jsonl`` with time, host and pid."""
    rec = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **event}
    with open(Path(run_dir) / "history.jsonl", "a") as fh:
        fh.write(json.dumps(rec, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ clean-up

def clean_stale_tmp(run_dir, subdirs: Iterable[str] = ("", "checkpoints", "snapshots", "samples")) -> list:
    """Remove ``.<name>.*.tmp`` / ``*.json.tmp`` left by writers killed mid-write. Call with the lock held."""
    removed = []
    for sub in subdirs:
        d = Path(run_dir) / sub
        if not d.is_dir():
            continue
        for p in list(d.glob(".*.tmp")) + list(d.glob("*.json.tmp")):
            if p.is_file() and p.name != LOCK_NAME:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def truncate_jsonl(path, max_nimg: int) -> int:
    """Drop lines of a per-tick log whose ``nimg`` exceeds ``max_nimg`` (replayed after a resume).

    Returns the number of lines dropped; a torn last line (a kill mid-write) is dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("nimg"), (int, float)) and rec["nimg"] > max_nimg:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.trunc.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return dropped
