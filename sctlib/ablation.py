"""The ECT / SCT ablation (SCT Fig. 3 and the two ingredients apart): one run = one arm x one seed.

Arms, from the same teacher, data and budget (names agreed across the project's config):

=============== ================================================ ==================================
arm             what changes against ECT                          overrides
=============== ================================================ ==================================
``ect``         nothing: single-sample target, staircase          loss.task=ect loss.schedule=staircase
``ect_target``  the stable (score-identity) target only           loss.task=sct loss.schedule=staircase
``ect_smooth``  the smooth schedule only, ending at ECT's final   loss.task=ect loss.schedule=smooth
                Delta t                                           loss.smooth_end=ect
``sct``         both                                              loss.task=sct loss.schedule=smooth
                                                                  loss.smooth_end=ect
=============== ================================================ ==================================

:func:`run_arm` trains (or resumes) the run, and at each requested number of images seen measures, on the EMA
model, FID at 1 and 2 steps (real Inception, :func:`sctlib.metrics.load_inception`) and the spread of the
mini-batch gradient (:func:`gradient_variance`); the per-tick target-variance diagnostics that the trainer logs
(``stats.jsonl``: loss spread, residual mean / variance per t bin, SCT weight statistics where present) are
copied alongside into ``runs/<run_name>/results.json``. :func:`aggregate_arms` turns several such records into
a table of mean and standard deviation over seeds, and :func:`plot_fid_curves` draws FID against images seen
with mean +- sd bands.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["ARMS", "ARM_OVERRIDES", "SMOKE_OVERRIDES", "smoke_params", "arm_overrides", "supported_overrides", "gradient_variance",
           "run_arm", "aggregate_arms", "plot_fid_curves", "STATS_KEYS", "load_run_model", "teacher_record",
           "guidance_record", "regroup", "final_diagnostics", "evidence_records", "plot_guidance", "DIAG_KEYS",
           "partial_runs", "paired_differences"]

ARMS: Tuple[str, ...] = ("ect", "ect_target", "ect_smooth", "sct")
ARM_OVERRIDES: Dict[str, Tuple[str, ...]] = {
    "ect": ("loss.task=ect", "loss.schedule=staircase"),
    "ect_target": ("loss.task=sct", "loss.schedule=staircase"),
    "ect_smooth": ("loss.task=ect", "loss.schedule=smooth", "loss.smooth_end=ect"),
    "sct": ("loss.task=sct", "loss.schedule=smooth", "loss.smooth_end=ect"),
}
_ARM_KEYS = ("loss.task", "loss.schedule", "loss.smooth_end")

# Tiny CPU settings for a smoke run (plumbing only: the numbers mean nothing).
SMOKE_OVERRIDES: Tuple[str, ...] = (
    "device=cpu", "net.model_channels=16", "net.num_blocks=1", "net.channel_mult=1,1", "net.attn_resolutions=16",
    "net.dropout=0", "batch_size=8", "tick_nimg=8", "checkpoint_nimg=16", "ema_halflife_nimg=64",
    "loss.double_nimg=16", "eval.num_samples=8", "workers=0",
)



def smoke_params() -> dict:
    """The run_arm arguments a smoke run replaces: a few CPU steps, FID over a handful of images."""
    return {"overrides": list(SMOKE_OVERRIDES), "total_nimg": 32, "eval_nimg": [16, 32], "fid_images": 8,
            "fid_ref_images": 16, "grad_batch_size": 4, "allow_scratch": True}


# stats.jsonl fields copied into results.json (those present; the SCT weight statistics only exist for SCT runs).
STATS_KEYS: Tuple[str, ...] = (
    "nimg", "loss", "loss_std", "stage_exponent", "t_bin_edges", "residual_mean", "residual_var", "residual_count",
    "sct_ess_mean", "sct_frac_mixed", "sct_own_weight_mean", "sct_ess_bins", "sct_frac_mixed_bins", "grad_norm",
    "precision", "skipped_steps", "fp16_skipped_steps", "loss_scale", "img_per_s",
)


def arm_overrides(arm: str, ref_source: str = "") -> List[str]:
    """The config overrides of an arm; ``ref_source`` (e.g. 'batch', 'bank', 'dataset') sets the reference set of
    the arms with the stable target."""
    if arm not in ARM_OVERRIDES:
        raise ValueError(f"unknown arm {arm!r}; valid: {', '.join(ARMS)}")
    out = list(ARM_OVERRIDES[arm])
    if ref_source and arm in ("ect_target", "sct"):
        out.append(f"loss.ref_source={ref_source}")
    return out


def _has_field(cls, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    for f in fields(cls):
        if f.name == head:
            if not rest:
                return True
            sub = f.default_factory() if callable(getattr(f, "default_factory", None)) else f.default
            return is_dataclass(sub) and _has_field(type(sub), rest)
    return False


def supported_overrides(overrides: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(kept, dropped): overrides whose key this sctlib's TrainConfig has, and those it lacks (e.g.
    ``loss.smooth_end`` before that switch existed). The caller records the dropped ones."""
    from .config import TrainConfig

    kept, dropped = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        (kept if _has_field(TrainConfig, key) else dropped).append(item)
    return kept, dropped


def _flat_grad(net: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double()
                      for p in net.parameters() if p.requires_grad])


def gradient_variance(model: nn.Module, loss_fn: Callable, batches: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]],
                      *, nimg: int, seed: int = 0) -> Dict[str, float]:
    """The spread of the mini-batch gradient of ``loss_fn`` at ``model``'s weights.

    For M batches (the same ones, with the same t / eps draws from ``seed``, for every arm), g_m is the gradient
    of the batch-mean loss. Returns ``grad_var_trace`` = sum_i Var_m(g_m,i) (ddof 1: the trace of the
    covariance of the mini-batch gradient estimator), ``grad_mean_sq`` = ||mean_m g_m||^2 and ``grad_snr`` =
    their ratio ``grad_mean_sq / grad_var_trace``. The paper's argument (SCT Sec. 4.1) is that a
    lower-variance target lowers the first at equal signal. ``model`` is copied: its weights, gradients and
    mode are untouched, and the global RNG state is restored.
    """
    if len(batches) < 2:
        raise ValueError(f"gradient_variance needs at least 2 batches, got {len(batches)}")
    net = copy.deepcopy(model).train()
    for p in net.parameters():
        p.requires_grad_(True)
    grads = []
    devices = [torch.device(p.device) for p in net.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        for m, (x0, labels) in enumerate(batches):
            torch.manual_seed(int(seed) * 1000 + m)
            net.zero_grad(set_to_none=True)
            loss, _ = loss_fn(net, x0, labels, nimg=nimg)
            loss.float().mean().backward()
            grads.append(_flat_grad(net))
    g = torch.stack(grads)
    mean = g.mean(0)
    var_trace = float(((g - mean) ** 2).sum(1).sum() / (len(grads) - 1))
    mean_sq = float((mean ** 2).sum())
    return {"grad_var_trace": var_trace, "grad_mean_sq": mean_sq,
            "grad_snr": mean_sq / var_trace if var_trace > 0 else float("inf")}


def _fixed_batches(dataset, cfg, *, num_batches: int, batch_size: int, device, seed: int):
    g = torch.Generator().manual_seed(int(seed) + 0xBA7C)
    idx = torch.randperm(len(dataset), generator=g)[: num_batches * batch_size]
    out = []
    for m in range(num_batches):
        items = [dataset[int(i)] for i in idx[m * batch_size:(m + 1) * batch_size]]
        x = torch.stack([it[0] for it in items]).to(device)
        lab = None
        if cfg.cond and getattr(dataset, "label_dim", 0):
            lab = torch.stack([torch.as_tensor(it[1]) for it in items]).to(device)
        out.append((x, lab))
    return out


def _read_jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_arm(arm: str, *, seed: int, data_path: str, base_preset: str, teacher: str = "",
            overrides: Sequence[str] = (), total_nimg: int, eval_nimg: Sequence[int], fid_images: int,
            run_name: str, runs_dir, fid_ref_images: int = 0, ref_source: str = "", grad_batches: int = 4,
            grad_batch_size: int = 0, inception_weights: Optional[str] = None, allow_scratch: bool = False,
            progress: bool = True) -> dict:
    """Train (or resume) one arm with one seed and write ``runs_dir/run_name/results.json``; returns the record.

    ``teacher`` is the initialisation (a run folder, a .safetensors, or a foreign pickle); '' (training from
    scratch) is refused unless ``allow_scratch`` (smoke runs: consistency tuning needs a teacher). ``overrides`` (key=value) adjust ``base_preset`` but may not set the arm's own keys
    (loss.task / loss.schedule / loss.smooth_end). At each ``eval_nimg`` point (images seen) the EMA model
    gets FID at 1 and 2 steps over ``fid_images`` generated images (seed set 0) against the statistics of
    ``fid_ref_images`` images of ``data_path`` (0 = all, cached), plus :func:`gradient_variance` over
    ``grad_batches`` fixed batches of ``grad_batch_size`` (0 = the run's batch size). Re-running the same call
    resumes the training and keeps the evaluations already made.
    """
    from . import book, evaluate, metrics
    from . import train as train_mod
    from .data import load_dataset
    from .losses import build_loss
    from .references import build_references

    if not teacher and not allow_scratch:
        raise ValueError("teacher is empty: the arms tune a diffusion teacher (a run folder or .safetensors); "
                         "pass allow_scratch=True only for smoke runs")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _ARM_KEYS:
            raise ValueError(f"override {item!r} sets the arm's own key {key!r}; choose the arm instead ({', '.join(ARMS)})")
    points = sorted({int(p) for p in eval_nimg})
    if not points or points[0] <= 0 or points[-1] > int(total_nimg):
        raise ValueError(f"eval_nimg must be points in (0, total_nimg={total_nimg}], got {list(eval_nimg)}")
    every = math.gcd(*points)
    wanted = [f"data_path={data_path}", "dataset=edmzip", f"init={teacher}", f"seed={int(seed)}",
              f"total_nimg={int(total_nimg)}", f"eval.every_nimg={every}", *overrides,
              *arm_overrides(arm, ref_source)]
    settings, dropped = supported_overrides(wanted)
    if dropped:
        # An arm that silently loses one of its switches is not the arm it claims to be: refuse.
        raise ValueError(f"this sctlib's config has no {', '.join(d.split('=')[0] for d in dropped)}: "
                         f"cannot run arm {arm!r} as defined")
    cfg = train_mod.resolve_config(base_preset, settings)
    run_dir = Path(runs_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)

    device = torch.device("cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu")
    extractor = metrics.load_inception(inception_weights or None, device=device)
    ref = metrics.inception_reference_stats(data_path, extractor=extractor, max_images=fid_ref_images or None,
                                            device=device, progress=progress)
    dataset = load_dataset("edmzip", path=data_path, cond=cfg.cond)
    # The gradient-spread probe uses the arm's own target: for ref_source='dataset' that needs the training set
    # (a memory bank would start empty here, so bank arms report the spread of a batch-reference target).
    refs = build_references(cfg.loss, dataset=dataset, num_classes=cfg.net.label_dim if cfg.cond else 0,
                            device=device, seed=seed) if cfg.loss.task == "sct" else None
    loss_fn = build_loss(cfg.loss, references=refs)
    batches = _fixed_batches(dataset, cfg, num_batches=grad_batches, batch_size=grad_batch_size or cfg.batch_size,
                             device=device, seed=seed)
    done = {int(r["eval_point"]) for r in _read_jsonl(run_dir / "evals.jsonl") if "eval_point" in r}

    def eval_fn(model, nimg):
        due = [p for p in points if p <= nimg and p not in done]
        if not due:
            return {"skipped": True}
        was = model.training
        model.eval()
        try:
            rep = evaluate.fid_report(model, cfg, ref, num_images=fid_images, seeds=(0,), steps=(1, 2),
                                      extractor=extractor, device=device, progress=False)
            out = {"eval_point": due[-1], "eval_points": due,
                   **{f"fid_{k}step": rep[f"fid_{k}step"]["mean"] for k in (1, 2)},
                   **gradient_variance(model, loss_fn, batches, nimg=nimg, seed=seed)}
        finally:
            model.train(was)
        done.update(due)
        print(f"{run_name}: {nimg} images seen: FID 1 step {out['fid_1step']:.3f}, 2 steps {out['fid_2step']:.3f}, "
              f"grad var {out['grad_var_trace']:.4g}")
        return out

    summary = train_mod.train(cfg, run_dir, progress=progress, eval_fn=eval_fn)
    curve = sorted((r for r in _read_jsonl(run_dir / "evals.jsonl") if "eval_point" in r),
                   key=lambda r: r["eval_point"])
    stats = [{k: line[k] for k in STATS_KEYS if k in line} for line in _read_jsonl(run_dir / "stats.jsonl")]
    results = {"arm": arm, "seed": int(seed), "curve": curve, "stats": stats}
    book.write_results(run_dir, results, extra={
        "arm": arm, "seed": int(seed), "base_preset": base_preset, "teacher": teacher, "data_path": data_path,
        "settings": settings, "dropped_overrides": dropped, "total_nimg": int(total_nimg), "eval_nimg": points,
        "fid_images": int(fid_images), "fid_ref_images": int(fid_ref_images),
        "inception": str(extractor.weights_path), "train_summary": {k: v for k, v in summary.items() if k != "last_tick"}})
    return json.loads((run_dir / "results.json").read_text())


def load_run_model(run_dir, *, device=None, ema: bool = True):
    """(model, cfg) of a run folder, finished or not: ``final`` if it exists, else the newest checkpoint
    (its EMA weights when ``ema``), with the run's resolved ``config.json``. A time-boxed teacher has no
    ``final``; this is what its tuning runs start from (``init=<run folder>``)."""
    from .config import TrainConfig, from_dict
    from .networks import build_network
    from .train import _init_state_dict

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json (not a run folder)")
    raw = json.loads(cfg_path.read_text())
    cfg = from_dict(TrainConfig, raw.get("config", raw))
    model = build_network(cfg.net)
    model.load_state_dict(_init_state_dict(str(run_dir), ema=ema))
    return model.to(device or "cpu").eval(), cfg


def teacher_record(run_dir, *, data_path: str, fid_images: int, fid_ref_images: int = 0, out=None,
                   inception_weights: Optional[str] = None, steps: int = 18) -> dict:
    """FID of a diffusion teacher with EDM's Heun sampler (``steps`` steps, 2 steps - 1 network evaluations),
    EMA weights of its newest checkpoint, seed set 0; written as JSON to ``out`` when given."""
    import time

    from . import evaluate, metrics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_run_model(run_dir, device=device)
    extractor = metrics.load_inception(inception_weights, device=device)
    ref = metrics.inception_reference_stats(data_path, extractor=extractor, max_images=fid_ref_images or None,
                                            device=device, progress=False)
    t0 = time.time()
    rep = evaluate.fid_report(model, cfg, ref, num_images=fid_images, seeds=(0,), steps=(steps,),
                              extractor=extractor, device=device, progress=False, sampler="heun")
    stats = _read_jsonl(Path(run_dir) / "stats.jsonl")
    rec = {"run": str(run_dir), "sampler": "heun", "steps": steps, "nfe": 2 * steps - 1,
           "fid": rep[f"fid_{steps}step"]["mean"], "fid_images": int(fid_images),
           "fid_ref_images": int(fid_ref_images), "nimg": stats[-1]["nimg"] if stats else None,
           "seconds": time.time() - t0, "inception": str(extractor.weights_path)}
    if out:
        Path(out).write_text(json.dumps(rec, indent=1))
    return rec


def guidance_record(run_dir, *, data_path: str, fid_images: int, fid_ref_images: int = 0, out=None,
                    ws: Sequence[float] = (1.0, 1.2, 1.4, 1.7, 2.0), steps: Sequence[int] = (1, 2),
                    inception_weights: Optional[str] = None) -> dict:
    """Autoguidance of a finished run by its own EMA snapshots (SCT Sec. 4.4 / Fig. 6 [RECON]):
    :func:`sctlib.evaluate.guidance_sweep` with FID at 1 and 2 steps for every snapshot fraction and w.
    Written as JSON to ``out`` when given."""
    from . import evaluate, metrics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_run_model(run_dir, device=device)  # final (EMA) weights once the run has finished
    extractor = metrics.load_inception(inception_weights, device=device)
    ref = metrics.inception_reference_stats(data_path, extractor=extractor, max_images=fid_ref_images or None,
                                            device=device, progress=False)

    def score(guide, w):
        rep = evaluate.fid_report(model, cfg, ref, num_images=fid_images, seeds=(0,), steps=steps,
                                  extractor=extractor, device=device, progress=False, guide=guide, w=w)
        return {f"fid_{k}step": rep[f"fid_{k}step"]["mean"] for k in steps}

    rows = evaluate.guidance_sweep(model, run_dir, score, ws=ws, device=device)
    rec = {"run": str(run_dir), "rows": rows, "ws": list(ws), "fid_images": int(fid_images),
           "fid_ref_images": int(fid_ref_images), "inception": str(extractor.weights_path)}
    if out:
        Path(out).write_text(json.dumps(rec, indent=1))
    return rec


def aggregate_arms(records: Sequence[dict], keys: Sequence[str] = ("fid_1step", "fid_2step", "grad_var_trace")) -> List[dict]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) over seeds, per arm and eval point.

    ``records``: results.json records of :func:`run_arm` (or their ``results`` parts). Returns rows
    ``{'arm', 'nimg', 'n_seeds', 'seeds', '<key>_mean', '<key>_sd', ...}`` sorted by arm (in :data:`ARMS`
    order) and images seen. Seeds of one arm must be distinct and have the same eval points.
    """
    by_arm: Dict[str, Dict[int, dict]] = {}
    for rec in records:
        r = rec.get("results", rec)
        arm, seed = r["arm"], int(r["seed"])
        if seed in by_arm.setdefault(arm, {}):
            raise ValueError(f"arm {arm!r} has seed {seed} twice")
        by_arm[arm][seed] = {int(c["eval_point"]): c for c in r["curve"]}
    rows = []
    for arm in sorted(by_arm, key=lambda a: (ARMS.index(a) if a in ARMS else len(ARMS), a)):
        seeds = sorted(by_arm[arm])
        pts = [sorted(by_arm[arm][s]) for s in seeds]
        if any(p != pts[0] for p in pts):
            raise ValueError(f"arm {arm!r}: the seeds were evaluated at different points: "
                             + "; ".join(f"seed {s}: {p}" for s, p in zip(seeds, pts)))
        for nimg in pts[0]:
            row = {"arm": arm, "nimg": nimg, "n_seeds": len(seeds), "seeds": seeds}
            for k in keys:
                v = np.array([by_arm[arm][s][nimg].get(k, np.nan) for s in seeds], dtype=np.float64)
                row[f"{k}_mean"] = float(v.mean())
                row[f"{k}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            rows.append(row)
    return rows


def plot_fid_curves(rows: Sequence[dict], *, steps: Sequence[int] = (1, 2), axes=None, log_y: bool = False):
    """FID against images seen, one panel per step count, one line per arm with a mean +- sd band (rows from
    :func:`aggregate_arms`). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, len(steps), figsize=(5.0 * len(steps), 3.6), squeeze=False)
        axes = axes[0]
    else:
        fig = axes[0].figure
    arms = [a for a in dict.fromkeys(r["arm"] for r in rows)]
    single = len({r["nimg"] for r in rows}) == 1  # one eval point: arms side by side with sd error bars
    for ax, k in zip(axes, steps):
        for i, arm in enumerate(arms):
            rr = [r for r in rows if r["arm"] == arm]
            x = np.array([r["nimg"] for r in rr], dtype=np.float64)
            m = np.array([r[f"fid_{k}step_mean"] for r in rr])
            s = np.array([r[f"fid_{k}step_sd"] for r in rr])
            label = f"{arm} (n={rr[0]['n_seeds']})"
            if single:
                ax.errorbar([i], m, yerr=s, marker="o", ms=5, capsize=4, ls="none", label=label)
                continue
            (line,) = ax.plot(x, m, marker="o", ms=3, label=label)
            ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2, lw=0)
        if single:
            ax.set_xticks(range(len(arms)), arms)
            ax.set_xlim(-0.6, len(arms) - 0.4)
            ax.set_xlabel(f"at {int(rows[0]['nimg']):,} images seen (mean +- sd over seeds)")
            ax.set_ylabel(f"FID, {k} step{'s' if k > 1 else ''}")
            ax.legend(fontsize=8)
            continue
        ax.set_xlabel("images seen")
        ax.set_ylabel(f"FID, {k} step{'s' if k > 1 else ''}")
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# From a set of runs (experiments/natural32.sh collect) to the book's records.

DIAG_KEYS: Tuple[str, ...] = ("sct_ess_mean", "sct_frac_mixed", "sct_own_weight_mean", "fp16_skipped_steps",
                              "skipped_steps", "img_per_s")


def regroup(runs: Dict[str, dict], group_of: Callable[[str], Optional[str]]) -> List[dict]:
    """The ``results`` parts of the runs whose name ``group_of`` maps to a group, with ``arm`` set to that
    group (so :func:`aggregate_arms` averages over the seeds of a group). Runs mapped to None are left out."""
    out = []
    for name in sorted(runs):
        group = group_of(name)
        if group is None:
            continue
        r = copy.deepcopy(runs[name].get("results", runs[name]))
        r["arm"], r["run"] = group, name
        out.append(r)
    return out


def final_diagnostics(results: Sequence[dict], keys: Sequence[str] = DIAG_KEYS) -> List[dict]:
    """Per group: mean and sd over seeds of the last tick's diagnostics (``stats``), and the sum over ticks of
    the skipped-step counters. Keys a run does not log (ESS for ECT arms) are left out."""
    by: Dict[str, List[dict]] = {}
    for r in results:
        by.setdefault(r["arm"], []).append(r)
    rows = []
    for group, rs in by.items():
        row = {"group": group, "n_seeds": len(rs)}
        for k in keys:
            if k.endswith("skipped_steps"):
                vals = [sum(float(t.get(k) or 0) for t in r["stats"]) for r in rs if any(k in t for t in r["stats"])]
            else:
                vals = [float(r["stats"][-1][k]) for r in rs if r["stats"] and r["stats"][-1].get(k) is not None]
            if vals:
                row[f"{k}_mean"] = float(np.mean(vals))
                row[f"{k}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        # Per-t-bin statistics of the last tick (mean over seeds), with the bin edges they refer to.
        for k in ("sct_ess_bins", "sct_frac_mixed_bins"):
            per = [r["stats"][-1][k] for r in rs if r["stats"] and r["stats"][-1].get(k) is not None]
            if per and all(len(p) == len(per[0]) for p in per):
                row[k] = [float(v) for v in np.nanmean(np.array(per, dtype=np.float64), axis=0)]
                row["t_bin_edges"] = rs[0]["stats"][-1].get("t_bin_edges")
        rows.append(row)
    return rows


_EVIDENCE_GROUPS: Dict[str, Callable[[str], Optional[str]]] = {
    # record name -> run name -> group
    "ablation": lambda n: n.split("-")[1] if n.startswith("abl-") else None,
    "precision": lambda n: n.split("-")[1] if n.startswith("prec-") else None,
    "reference_sources": lambda n: ("dataset" if n.startswith("abl-sct-") else
                                    "bank (4,096)" if n.startswith("ref-bank-") else
                                    "batch" if n.startswith("ref-batch-") else None),
}


def partial_runs(partial: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Runs stopped before their end, as run records :func:`evidence_records` accepts.

    ``partial``: ``{run name: {'curve': evaluation rows of its evals.jsonl, 'stats': lines of its stats.jsonl}}``
    (what ``experiments/natural32.sh collect`` keeps of a run cut by a time limit; a bare list is the curve
    alone, as older collects wrote it). Each becomes ``{'results': {'seed', 'curve', 'stats', 'partial':
    True}}`` (stats reduced to :data:`STATS_KEYS`) with the seed from the name's ``-s<seed>`` suffix; a run
    with no evaluation is left out.
    Seeds of one group must then share their eval points (:func:`aggregate_arms` checks), so a group whose
    runs were cut at different points is refused rather than averaged over unequal lengths.
    """
    out: Dict[str, dict] = {}
    for name, evals in sorted(partial.items()):  # evals: {'curve', 'stats'} or the curve alone
        head, sep, seed = name.rpartition("-s")
        if not sep or not seed.isdigit():
            raise ValueError(f"partial run {name!r}: the name does not end in -s<seed>")
        rec = evals if isinstance(evals, dict) else {"curve": evals, "stats": []}
        stats = [{k: line[k] for k in STATS_KEYS if k in line} for line in rec.get("stats") or []]
        # As run_arm reads evals.jsonl: only evaluation rows (other lines, e.g. a guidance sweep, carry no
        # eval_point), in the order of their eval point.
        curve = sorted((r for r in rec.get("curve") or [] if "eval_point" in r), key=lambda r: r["eval_point"])
        if curve:
            out[name] = {"results": {"seed": int(seed), "curve": curve, "stats": stats, "partial": True}}
    return out


def paired_differences(record: dict, *, baseline: str, eval_point: Optional[int] = None,
                       keys: Sequence[str] = ("fid_1step", "fid_2step")) -> List[dict]:
    """Per group, the difference to ``baseline`` of runs with the same seed (same teacher, images and noise
    draws), at one evaluation point.

    ``record``: what :func:`evidence_records` wrote (its ``results.curves``). Pairing by seed removes the
    spread that all formats share (the seed's data order and noise draws), so a difference smaller than
    the groups' standard deviation can still be consistent in sign. ``eval_point`` None: per group, the
    latest point that every paired run of the group and of the baseline reached (a run cut early does not
    pull other groups back). Seeds whose value is missing or not finite are left out of that key.
    Returns one row per group other than the baseline: ``{'group', 'eval_point', 'seeds', '<key>_diffs',
    '<key>_seeds', '<key>_mean_diff', '<key>_same_sign'}`` (``same_sign``: every seed's difference has the
    sign of the mean; with three seeds that happens by chance with probability 1/4). A group that shares no
    seed and point with the baseline gets ``seeds: []`` and no differences, so one cut run does not stop a
    report.
    """
    curves = record["results"]["curves"]
    by: Dict[str, Dict[int, Dict[int, dict]]] = {}
    for c in curves:
        by.setdefault(c["group"], {})[int(c["seed"])] = {int(e["eval_point"]): e for e in c["curve"]}
    if baseline not in by:
        raise ValueError(f"paired_differences: no group {baseline!r} in the record (groups: {sorted(by)})")
    base = by[baseline]

    def value(e, k):
        v = e.get(k)
        return float(v) if v is not None and np.isfinite(float(v)) else None

    rows = []
    for group, seeds in sorted(by.items()):
        if group == baseline:
            continue
        shared = sorted(s for s in seeds if s in base)
        if eval_point is None:
            common = set.intersection(*(set(seeds[s]) & set(base[s]) for s in shared)) if shared else set()
            point = max(common) if common else None
        else:
            point = eval_point
        paired = [s for s in shared if point is not None and point in seeds[s] and point in base[s]]
        row: Dict[str, object] = {"group": group, "eval_point": point, "seeds": paired}
        for k in keys:
            pairs = [(s, value(seeds[s][point], k), value(base[s][point], k)) for s in paired]
            pairs = [(s, a - b) for s, a, b in pairs if a is not None and b is not None]
            if not pairs:
                continue
            d = [x for _, x in pairs]
            m = float(np.mean(d))
            row[f"{k}_seeds"], row[f"{k}_diffs"], row[f"{k}_mean_diff"] = [s for s, _ in pairs], d, m
            row[f"{k}_same_sign"] = bool(all(np.sign(x) == np.sign(m) and x != 0 for x in d))
        rows.append(row)
    return rows


def evidence_records(runs: Dict[str, dict], *, prefix: str, command: str, setting: str,
                     guidance: Optional[dict] = None, teacher: Optional[dict] = None) -> Dict[str, dict]:
    """Book records (``book/results/<prefix>_<kind>.json``) from complete runs ``{run name: results.json}``.

    Groups by run name: ``abl-<arm>-s<seed>`` (the ablation), ``prec-<format>-s<seed>`` (matched precision
    runs), ``ref-<batch|bank>-s<seed>`` with ``abl-sct-s<seed>`` as the whole-set source (SCT Fig. 4). Each
    record holds the mean / sd table over seeds (:func:`aggregate_arms`), the last-tick diagnostics
    (:func:`final_diagnostics`), every run's curve, ``command`` and ``setting`` (the sizes, in words).
    ``guidance`` (:func:`guidance_record`) and ``teacher`` (:func:`teacher_record`) become records of their own.
    """
    out: Dict[str, dict] = {}
    for kind, group_of in _EVIDENCE_GROUPS.items():
        res = regroup(runs, group_of)
        if not res:
            continue
        by_group: Dict[str, set] = {}
        for r in res:
            by_group.setdefault(r["arm"], set()).add(int(r["seed"]))
        if kind == "reference_sources" and len(by_group) < 2:
            continue  # the whole-set arm alone compares nothing (its numbers are in the ablation record)
        out[f"{prefix}_{kind}"] = {
            "results": {"rows": aggregate_arms(res), "diagnostics": final_diagnostics(res),
                        "curves": [{"run": r["run"], "group": r["arm"], "seed": r["seed"], "curve": r["curve"]}
                                   for r in res]},
            "groups": {g: sorted(s) for g, s in by_group.items()},
            "command": command, "setting": setting,
            "runs": {r["run"]: {k: runs[r["run"]].get(k) for k in ("settings", "git_sha", "written", "host",
                                                                   "total_nimg", "fid_images", "inception")}
                     for r in res},
        }
    if guidance:
        out[f"{prefix}_guidance"] = {"results": {"rows": guidance["rows"]}, "command": command, "setting": setting,
                                     **{k: v for k, v in guidance.items() if k != "rows"}}
    if teacher:
        out[f"{prefix}_teacher"] = {"results": teacher, "command": command, "setting": setting}
    return out


def plot_guidance(rows: Sequence[dict], *, steps: Sequence[int] = (1, 2)):
    """FID against the guidance strength w, one line per EMA-snapshot fraction, the unguided model as a
    dashed line (rows of :func:`guidance_record`). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(steps), figsize=(5.0 * len(steps), 3.4), squeeze=False)
    base = next((r for r in rows if r["frac"] is None), None)
    fracs = sorted({r["frac"] for r in rows if r["frac"] is not None})
    for ax, k in zip(axes[0], steps):
        for f in fracs:
            rr = sorted((r for r in rows if r["frac"] == f), key=lambda r: r["w"])
            ws = [1.0] + [r["w"] for r in rr] if base else [r["w"] for r in rr]
            v = ([base[f"fid_{k}step"]] if base else []) + [r[f"fid_{k}step"] for r in rr]
            ax.plot(ws, v, marker="o", ms=3, label=f"guide: EMA at {f:.0%} of training")
        if base:
            ax.axhline(base[f"fid_{k}step"], color="grey", ls="--", lw=1, label="unguided")
        ax.set_xlabel("guidance strength w")
        ax.set_ylabel(f"FID, {k} step{'s' if k > 1 else ''}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
