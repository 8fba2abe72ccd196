"""Helpers for the book's chapters and the pipelines: one set-up call, run records, standard plots.

Chapters open with ``import sctlib as sct; sct.book.setup()``. Results written by the pipelines live in
``runs/<name>/results.json``; the results the book reports are committed as ``book/results/<name>.json``
(with figures ``book/results/<name>_*.png``), so the book builds on a machine that never trained them.
The committed record is always the book's number: a reader's own run in ``runs/`` is read only when asked
for (``own=True``) and is shown beside it, labelled as the reader's run (:func:`render_records`).
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
           "plot_residual_by_t", "results_table", "Table", "record_table", "result_records", "render_records",
           "record_claim", "claims_table", "paper_table", "glue"]


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
                                    "font.size": 10, "legend.fontsize": 9, "legend.framealpha": 0.8,
                                    # large counts (images seen) as "x1e5" instead of long overlapping labels
                                    "axes.formatter.limits": (-3, 4)})
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass


def _git_sha() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=project_root()).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def write_results(run_dir, results: dict, *, paper=None, extra: Optional[dict] = None) -> Path:
    """Write ``run_dir/results.json``: metrics, the paper's values where they exist, and provenance."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "results": results,
        "paper": paper if paper is not None else [],  # sctlib.paper.comparison rows
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


def load_results(name: str, *, own: bool = False) -> dict:
    """Read a results record by run name.

    By default the committed record ``book/results/<name>.json`` (the book's number). With ``own=True``
    the reader's own run ``runs/<name>/results.json``. Never one in place of the other: a missing file
    raises FileNotFoundError naming it.
    """
    root = project_root()
    path = root / "runs" / name / "results.json" if own else root / "book" / "results" / f"{name}.json"
    if not path.exists():
        hint = "run its pipeline (see the README)" if own else "the book has no committed record of that name"
        raise FileNotFoundError(f"{path.relative_to(root)} does not exist: {hint}")
    return json.loads(path.read_text())


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


# ------------------------------------------------------------------------------------------------
# Rendered tables (HTML in the book, aligned text in a terminal) without pandas.

def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


class Table:
    """A small table that renders as HTML in notebooks and the book, and as aligned text elsewhere.

    ``rows`` is a list of lists (or of dicts, read by ``columns``); numbers are formatted to 4 significant
    digits; ``caption`` is shown above the table.
    """

    def __init__(self, rows, columns, *, caption: str = "", index: Optional[Iterable[str]] = None):
        self.columns = list(columns)
        rows = list(rows)
        self.rows = [[r.get(c) for c in self.columns] if isinstance(r, dict) else list(r) for r in rows]
        if index is not None:
            self.columns = ["", *self.columns]
            self.rows = [[i, *r] for i, r in zip(index, self.rows)]
        self.caption = caption

    def cells(self):
        return [[_fmt(v) for v in r] for r in self.rows]

    def _repr_html_(self) -> str:
        import html

        esc = html.escape
        num = [all(isinstance(r[j], (int, float)) or r[j] is None for r in self.rows) for j in range(len(self.columns))]
        head = "".join(f"<th>{esc(str(c))}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f'<td style="text-align:{"right" if num[j] else "left"}">{esc(c)}</td>'
                                        for j, c in enumerate(r)) + "</tr>" for r in self.cells())
        cap = f"<caption>{esc(self.caption)}</caption>" if self.caption else ""
        return (f'<table class="table sctlib-table">{cap}<thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        cells = [[str(c) for c in self.columns], *self.cells()]
        widths = [max(len(r[j]) for r in cells) for j in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return (self.caption + "\n" if self.caption else "") + "\n".join(lines)


def record_table(results: dict, *, caption: str = "") -> Table:
    """A results dict as a Table: ``{run: {metric: value}}`` (columns in first-seen order, not sorted) or
    ``{metric: {mean, sd, min, ...}}`` (a FID over seed sets)."""
    cols: list = []
    for v in results.values():
        for k in (v if isinstance(v, dict) else {"value": v}):
            if k not in cols and not isinstance((v if isinstance(v, dict) else {}).get(k), (list, dict)):
                cols.append(k)
    rows = [[(v if isinstance(v, dict) else {"value": v}).get(c) for c in cols] for v in results.values()]
    return Table(rows, cols, caption=caption, index=list(results))


# ------------------------------------------------------------------------------------------------
# The results chapter: every committed record, and the reader's own runs beside them.

def result_records(folder=None) -> list:
    """The committed records ``book/results/*.json`` as (name, record) pairs, sorted by name."""
    folder = Path(folder) if folder else project_root() / "book" / "results"
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            out.append((p.stem, json.loads(p.read_text())))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
    return out


def _record_tables(name: str, rec: dict, label: str) -> list:
    tables = []
    res = rec.get("results")
    if isinstance(res, dict) and res:
        # Records that hold lists of flat rows (an ablation's mean/sd table, its diagnostics, its runs): one
        # table per list, scalar columns only; otherwise the whole dict as one table.
        lists = {k: v for k, v in res.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
        for key, rows in lists.items():
            cols = [c for c in rows[0] if not isinstance(rows[0][c], (list, dict))]
            tables.append(Table(rows, cols, caption=f"{name}: {key} ({label})"))
        if not lists:
            tables.append(record_table(res, caption=f"{name}: results ({label})"))
    if isinstance(rec.get("rows"), list) and rec["rows"]:
        cols = [c for c in rec["rows"][0] if not isinstance(rec["rows"][0][c], (list, dict))]
        tables.append(Table(rec["rows"], cols, caption=f"{name}: measurements ({label})"))
    paper = rec.get("paper")
    if isinstance(paper, list) and paper:
        tables.append(paper_table(paper, caption=f"{name}: the paper's matching numbers"))
    return tables


def _provenance(rec: dict) -> str:
    bits = []
    for key in ("preset", "device", "written", "git_sha"):
        val = rec.get(key) or (rec.get("host") or {}).get(key)
        if val:
            bits.append(f"{key}: {str(val)[:12] if key == 'git_sha' else val}")
    if isinstance(rec.get("settings"), dict):
        bits.append("settings: " + ", ".join(f"{k}={_fmt(v)}" for k, v in rec["settings"].items()))
    if isinstance(rec.get("wall_s"), dict):
        bits.append("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in rec["wall_s"].items()))
    return "; ".join(bits)


def render_records(folder=None, *, own_runs: bool = True, skip: Iterable[str] = ()) -> list:
    """Display every committed record in ``book/results/`` (tables, provenance, its ``<name>_*.png``
    figures), then - for each record whose run also exists in ``runs/`` - the reader's own run, labelled.

    A new result file appears in the book without new code. Returns the names rendered.
    """
    from IPython.display import HTML, Image, display

    import html as _html

    root = project_root()
    folder = Path(folder) if folder else root / "book" / "results"
    names = []
    for name, rec in result_records(folder):
        if name in set(skip):
            continue
        names.append(name)
        display(HTML(f"<p><strong>Record <code>{_html.escape(name)}</code></strong> (committed, "
                     f"<code>book/results/{_html.escape(name)}.json</code>). {_html.escape(_provenance(rec))}</p>"))
        for t in _record_tables(name, rec, "committed"):
            display(t)
        for png in sorted(folder.glob(f"{name}_*.png")):
            display(Image(filename=str(png), width=720))
            caption = png.stem[len(name) + 1:].replace("_", " ")
            display(HTML(f"<p><em>{_html.escape(name)}: {_html.escape(caption)} "
                         f"(<code>book/results/{_html.escape(png.name)}</code>).</em></p>"))
        own = root / "runs" / name / "results.json"
        if own_runs and own.exists():
            mine = json.loads(own.read_text())
            display(HTML(f"<p><strong>Your own run</strong> of <code>{_html.escape(name)}</code> "
                         f"(<code>runs/{_html.escape(name)}/results.json</code>; not the book's number). "
                         f"{_html.escape(_provenance(mine))}</p>"))
            for t in _record_tables(name, mine, "your run"):
                display(t)
    return names


# ------------------------------------------------------------------------------------------------
# The paper's claims: chapters record what they measured; the paper page renders the table.

def _claims_dir() -> Path:
    return project_root() / "runs" / "book" / "claims"


def record_claim(claim_id: int, ours: str, status: str) -> None:
    """Record what a chapter measured for one of the paper's claims (:data:`sctlib.paper.CLAIMS`).

    ``ours`` is our number in words ("residual 70-260x lower"); ``status`` one of 'agrees', 'disagrees',
    'partly', 'not tested'. Written to ``runs/book/claims/<id>.json``; the page *What the paper says*
    shows them in its claims table.
    """
    from . import paper

    paper.claim(claim_id)  # KeyError on an unknown id
    if status not in ("agrees", "disagrees", "partly", "not tested"):
        raise ValueError(f"status {status!r}: use 'agrees', 'disagrees', 'partly' or 'not tested'")
    rec = {"id": claim_id, "ours": ours, "status": status,
           "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    d = _claims_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{claim_id}.json").write_text(json.dumps(rec))


def paper_table(rows=None, *, caption: str = "") -> Table:
    """The published numbers (:data:`sctlib.paper.ROWS`, or the dicts a pipeline stored) as a Table."""
    from dataclasses import asdict

    from . import paper

    rows = [asdict(r) if not isinstance(r, dict) else r for r in (paper.ROWS if rows is None else rows)]
    out = []
    for r in rows:
        fid = _fmt(r["fid"]) + (f" ({_fmt(r['fid_parenthesised'])})" if r.get("fid_parenthesised") else "")
        model = r["model"] + (", cond." if r["cond"] and r["dataset"] == "cifar10" else "")
        it = f"{r['iterations'] // 1000}k" if r.get("iterations") else "not stated"
        caveat = r.get("caveat", "")
        if caveat.startswith(paper.EXTRACTION_CAVEAT):  # said once above the table, not in every row
            caveat = "third-party extraction" + caveat[len(paper.EXTRACTION_CAVEAT):]
        out.append([r["dataset"], r["method"], model, it, r["steps"], fid, r["source"], caveat])
    return Table(out, ["dataset", "method", "model", "iterations", "steps", "FID", "source", "caveat"],
                 caption=caption)


def claims_table(*, caption: str = "") -> Table:
    """Claim, our experiment, our number, the paper's number, status: one row per paper claim.

    Our numbers come from the chapters' records (:func:`record_claim`, written when a chapter executes;
    the book's page that renders this table, ``book/what_is_known.md``, sorts after every chapter, and
    Sphinx executes pages in sorted order). Claims without a record show as not tested.
    """
    from . import paper

    d = _claims_dir()
    rows = []
    for c in paper.CLAIMS:
        p = d / f"{c.id}.json"
        rec = json.loads(p.read_text()) if p.exists() else None
        if rec:
            ours, status = rec["ours"], rec["status"]
        elif c.chapter == "results" and c.id in (12, 13):
            ours, status = "no paper-scale run committed yet", "not tested"
        else:
            ours, status = f"not measured in this build (page '{c.chapter}')", "not tested"
        rows.append([c.id, f"{c.claim} [{c.where}]", f"{c.experiment} (page '{c.chapter}')", ours,
                     c.paper_number, status])
    return Table(rows, ["#", "the paper's claim [where]", "our experiment", "our number", "the paper's number",
                        "status"], caption=caption)


def glue(name: str, value) -> None:
    """Store a value for the chapter's prose (``{glue:text}`name```), so a number in the text is the one the
    code computed. Outside a Jupyter Book build (no myst-nb) it does nothing."""
    try:
        from myst_nb import glue as _glue
    except ImportError:  # pragma: no cover - myst-nb comes with the [book] extra
        return
    _glue(name, value, display=False)
