"""Helpers for the book's chapters and the pipelines: one set-up call, run records, standard plots.

Chapters open with ``import sctlib as sct; sct.book.setup()``. Results written by the pipelines live in
``runs/<name>/results.json``; results that the book shows from GPU runs are copied into
``book/results/<name>.json`` (committed), so the book builds on a machine that never trained them.
"""
from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

__all__ = ["setup", "project_root", "write_results", "load_results", "read_stats", "plot_training",
           "plot_residual_by_t", "results_table"]


def project_root() -> Path:
    """The repository root (the folder holding ``_config.yml``), found upwards from the working directory."""
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "_config.yml").exists() and (p / "sctlib").is_dir():
            return p
    return Path(__file__).resolve().parents[1]


def setup(seed: int = 0, *, threads: Optional[int] = None) -> None:
    """Seed python, numpy and torch, pick deterministic CPU kernels, and set the plot style."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    try:
        import matplotlib

        matplotlib.rcParams.update({"figure.dpi": 100, "figure.figsize": (6.4, 3.6), "axes.grid": True,
                                    "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
                                    "font.size": 10})
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass


def _git_sha() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=project_root()).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def write_results(run_dir, results: dict, *, paper: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """Write ``run_dir/results.json``: metrics, the paper's values where they exist, and provenance."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "results": results,
        "paper": paper or {},
        "git_sha": _git_sha(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "threads": torch.get_num_threads()},
        **(extra or {}),
    }
    path = run_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=float))
    os.replace(tmp, path)
    return path


def load_results(name: str) -> dict:
    """Read a results record by run name: ``runs/<name>/results.json``, else ``book/results/<name>.json``."""
    root = project_root()
    for p in (root / "runs" / name / "results.json", root / "book" / "results" / f"{name}.json"):
        if p.exists():
            return json.loads(p.read_text())
    raise FileNotFoundError(f"no results for {name!r}: run its pipeline (see the README) to create "
                            f"runs/{name}/results.json")


def read_stats(run_dir) -> list:
    """The per-tick lines of ``run_dir/stats.jsonl``."""
    path = Path(run_dir) / "stats.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (has the run started?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(run_dirs: Iterable, labels: Optional[Iterable[str]] = None, *, key: str = "loss", ax=None):
    """Plot a stats.jsonl column against images seen for several runs."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    run_dirs = list(run_dirs)
    labels = list(labels) if labels is not None else [Path(d).name for d in run_dirs]
    for d, lab in zip(run_dirs, labels):
        rows = read_stats(d)
        ax.plot([r["nimg"] for r in rows], [r[key] for r in rows], label=lab)
    ax.set_xlabel("images seen")
    ax.set_ylabel(key)
    ax.legend()
    return ax


def plot_residual_by_t(run_dirs: Iterable, labels: Optional[Iterable[str]] = None, *, last: int = 5, ax=None):
    """Mean squared training residual ||target - f(x_t, t)||^2/d per t-bin over the last ticks (ECT vs SCT)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    run_dirs = list(run_dirs)
    labels = list(labels) if labels is not None else [Path(d).name for d in run_dirs]
    for d, lab in zip(run_dirs, labels):
        rows = read_stats(d)[-last:]
        edges = np.asarray(rows[0]["t_bin_edges"])
        centres = np.sqrt(edges[1:] * edges[:-1])
        s = np.sum([np.asarray(r["residual_mean"]) * np.asarray(r["residual_count"]) for r in rows], axis=0)
        n = np.sum([np.asarray(r["residual_count"]) for r in rows], axis=0)
        inner = (s / np.maximum(n, 1))[1:-1]
        ok = n[1:-1] > 0
        ax.loglog(centres[ok], inner[ok], marker="o", label=lab)
    ax.set_xlabel("t")
    ax.set_ylabel("mean ||target - f(x_t,t)||^2 / d")
    ax.legend()
    return ax


def results_table(rows: dict, columns: Iterable[str]):
    """A pandas-free HTML/markdown-friendly table: returns a list of lists with a header row."""
    columns = list(columns)
    out = [["run", *columns]]
    for name, res in rows.items():
        out.append([name, *[("—" if res.get(c) is None else f"{res[c]:.4g}" if isinstance(res.get(c), float)
                             else str(res.get(c))) for c in columns]])
    return out
