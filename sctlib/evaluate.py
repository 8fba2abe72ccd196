"""Generate samples from a trained model and score them: the glue between samplers and metrics.

Every evaluation is seeded: the same model, seed and settings give the same numbers (ECT's evaluation
draws unseeded latents, ect-edm-code-facts.md Sec. 6 item 13).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from . import metrics, samplers

__all__ = ["sampler_for", "snapshot_paths", "guidance_sweep", "generate", "evaluate_digits", "evaluate_toy", "evaluate", "make_eval_fn", "seeded_generator", "fid_report",
           "train_and_report"]


SAMPLER_KINDS = ("auto", "cm", "heun", "phased")


def sampler_for(cfg, kind: str = "auto"):
    """The sampler a model trained with ``cfg`` (a TrainConfig) should be sampled with.

    Returns ``sample(f, noise, labels=None, *, steps, generator=None) -> x`` with attributes ``kind`` and
    ``default_steps`` (the step counts evaluations report). ``kind='auto'`` picks from what the model is:

    * a diffusion teacher (``loss.task == 'edm'``): EDM's Heun sampler, ``steps`` Heun steps (default 18);
    * a phased consistency model (``loss.edges`` with more than one phase, PCM / SCT Sec. 4.3-4.4
      [RECON]): :func:`sctlib.samplers.sample_phased` through the training edges with edge-skipping
      strength ``eval.eta``; one network evaluation per phase, so ``steps`` must equal the number of
      phases. Sampling such a model with the plain samplers below evaluates f^m outside the phase
      decomposition it was trained for;
    * otherwise consistency sampling: 1 step, or multistep through ``eval.mid_t`` (steps = 1 + len(mid_t)).

    ``kind`` 'cm', 'heun' or 'phased' forces a sampler (e.g. 'cm' to use a teacher as a 1-step model).
    """
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"unknown sampler {kind!r}; valid: {', '.join(SAMPLER_KINDS)}")
    edges = tuple(float(e) for e in cfg.loss.edges)
    t_max, mid_t = float(cfg.eval.t_max), tuple(cfg.eval.mid_t)
    if kind == "auto":
        kind = "heun" if cfg.loss.task == "edm" else "phased" if len(edges) > 1 else "cm"

    if kind == "heun":
        def sample(f, noise, labels=None, *, steps: int = 18, generator=None):
            return samplers.sample_heun(f, noise, labels, num_steps=steps, sigma_max=t_max)
        default_steps = (18,)
    elif kind == "phased":
        if len(edges) < 2:
            raise ValueError(f"sampler 'phased' needs loss.edges with more than one phase, got {edges}")
        eta = float(getattr(cfg.eval, "eta", 0.0))

        def sample(f, noise, labels=None, *, steps: int = len(edges), generator=None):
            if steps != len(edges):
                raise ValueError(f"this model was trained with {len(edges)} phases (loss.edges={edges}): phased "
                                 f"sampling takes {len(edges)} steps, not {steps}")
            return samplers.sample_phased(f, noise, labels, edges=edges, t_max=t_max, eta=eta, generator=generator)
        default_steps = (len(edges),)
    else:
        def sample(f, noise, labels=None, *, steps: int = 1, generator=None):
            if steps == 1:
                return samplers.sample_onestep(f, noise, labels, t_max=t_max, generator=generator)
            if len(mid_t) < steps - 1:
                raise ValueError(f"steps={steps} needs {steps - 1} intermediate times, eval.mid_t={mid_t}")
            return samplers.sample_multistep(f, noise, labels, t_steps=(t_max, *mid_t[: steps - 1]),
                                             generator=generator)
        default_steps = (1, 1 + len(mid_t)) if mid_t else (1,)
    sample.kind, sample.default_steps = kind, default_steps
    return sample


@torch.no_grad()
def generate(model: Callable, num: int, shape: Sequence[int], *, steps: int = 1, mid_t: Sequence[float] = (0.821,),
             t_max: float = 80.0, label_dim: int = 0, seed: int = 0, batch: int = 1000,
             device=None, sampler: str = "cm", guide: Optional[Callable] = None, w: float = 1.0,
             sample_fn: Optional[Callable] = None):
    """Draw ``num`` samples; returns (x [num, *shape] in data units, labels or None).

    ``sampler='cm'`` uses 1-step (steps=1) or multistep consistency sampling through ``mid_t``
    (steps = 1 + len(mid_t)); ``sampler='heun'`` runs EDM's Heun sampler for a diffusion teacher with
    ``steps`` steps. ``guide`` (a worse model) with ``w`` applies autoguidance f + (w-1)(f - f_bad).
    Labels cycle through the classes, so every class gets num/label_dim samples. ``sample_fn`` (from
    :func:`sampler_for`) replaces ``sampler``/``mid_t``/``t_max``.
    """
    if isinstance(model, nn.Module):
        device = device or next(model.parameters()).device
    device = torch.device(device or "cpu")
    f = model if guide is None else samplers.guided(model, guide, w)
    g = torch.Generator(device=device).manual_seed(int(seed))
    xs, ys = [], []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        noise = torch.randn((n, *shape), generator=g, device=device)
        labels = (torch.arange(start, start + n, device=device) % label_dim) if label_dim else None
        if sample_fn is not None:
            x = sample_fn(f, noise, labels, steps=steps, generator=g)
        elif sampler == "heun":
            x = samplers.sample_heun(f, noise, labels, num_steps=steps, sigma_max=t_max)
        elif steps == 1:
            x = samplers.sample_onestep(f, noise, labels, t_max=t_max, generator=g)
        else:
            if len(mid_t) != steps - 1:
                raise ValueError(f"steps={steps} needs {steps - 1} intermediate times, got mid_t={tuple(mid_t)}")
            x = samplers.sample_multistep(f, noise, labels, t_steps=(t_max, *mid_t), generator=g)
        xs.append(x.float())
        if labels is not None:
            ys.append(labels)
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def evaluate_digits(model, *, num_samples: int = 1000, steps: Sequence[int] = (1, 2), mid_t=(0.821,),
                    t_max: float = 80.0, seed: int = 0, label_dim: int = 10, resolution: int = 8,
                    sampler: str = "cm", guide=None, w: float = 1.0, layout: str = "resize",
                    sample_fn: Optional[Callable] = None) -> dict:
    """FD in the digits-classifier feature space and class accuracy, per number of steps.

    ``layout`` tells the classifier how the 8x8 digits were enlarged: 'resize' ('digits') or 'pad' ('digits-pad').
    """
    out = {}
    for k in steps:
        x, y = generate(model, num_samples, (1, resolution, resolution), steps=k, mid_t=mid_t[: k - 1],
                        t_max=t_max, label_dim=label_dim, seed=seed, sampler=sampler, guide=guide, w=w,
                        sample_fn=sample_fn)
        x = x.clamp(-1, 1)
        out[f"fd_{k}step"] = float(metrics.fd_digits(x, layout=layout))
        if y is not None:
            out[f"acc_{k}step"] = float(metrics.class_accuracy(x, y, layout=layout))
    return out


def evaluate_toy(model, mixture, *, num_samples: int = 4000, steps: Sequence[int] = (1, 2), mid_t=(0.5,),
                 t_max: float = 80.0, seed: int = 0, sampler: str = "cm", sample_fn: Optional[Callable] = None) -> dict:
    """Sliced Wasserstein distance to fresh mixture samples and NLL under the true density."""
    out = {}
    g = torch.Generator().manual_seed(seed + 1)
    ref, _ = mixture.sample(num_samples, generator=g)
    for k in steps:
        x, _ = generate(model, num_samples, (ref.shape[1],), steps=k, mid_t=mid_t[: k - 1], t_max=t_max,
                        seed=seed, sampler=sampler, sample_fn=sample_fn)
        x = x.cpu()
        out[f"swd_{k}step"] = float(metrics.sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(seed)))
        out[f"nll_{k}step"] = float(metrics.toy_nll(x, mixture))
    return out


def evaluate(model, cfg, *, num_samples: Optional[int] = None, seed: int = 0, steps=None, dataset=None,
             sampler: Optional[str] = None) -> dict:
    """Evaluate by the run's dataset: digits (FD + accuracy) or a 2-D toy (SWD + NLL).

    The sampler is :func:`sampler_for` ``(cfg, sampler or 'auto')``: Heun (18 steps, 35 evaluations) for a
    diffusion teacher, phased sampling for a phased model, consistency sampling with 1 and 2 steps
    otherwise; pass ``sampler='cm'`` to use a teacher (or a phased model's raw D) as a 1-step model.
    ``steps`` defaults to the sampler's ``default_steps``.
    """
    n = num_samples or cfg.eval.num_samples
    sample_fn = sampler_for(cfg, sampler or "auto")
    steps = tuple(steps) if steps is not None else sample_fn.default_steps
    if sample_fn.kind == "heun":
        steps = (18,)
    if cfg.dataset in ("digits", "digits-pad"):
        res = cfg.data_resolution or 8
        return evaluate_digits(model, num_samples=n, steps=steps, mid_t=cfg.eval.mid_t, t_max=cfg.eval.t_max,
                               seed=seed, label_dim=cfg.net.label_dim if cfg.cond else 0, resolution=res,
                               layout="pad" if cfg.dataset == "digits-pad" else "resize", sample_fn=sample_fn)
    if cfg.dataset.startswith("toy2d"):
        if dataset is None:
            from .data import load_dataset

            dataset = load_dataset(cfg.dataset, seed=cfg.seed)
        return evaluate_toy(model, dataset.mixture, num_samples=n, steps=steps, mid_t=cfg.eval.mid_t,
                            t_max=cfg.eval.t_max, seed=seed, sample_fn=sample_fn)
    raise ValueError(f"no built-in CPU evaluation for dataset {cfg.dataset!r}; use sctlib.metrics.fid_multi_seed")


def snapshot_paths(run_dir) -> dict:
    """{fraction of training: path} of a run's EMA snapshots (``snapshots/ema-<frac>.safetensors``)."""
    from pathlib import Path

    out = {}
    for p in sorted((Path(run_dir) / "snapshots").glob("ema-*.safetensors")):
        out[float(p.name[len("ema-"):-len(".safetensors")])] = p
    return out


def guidance_sweep(model, run_dir, score: Callable, *, ws: Sequence[float] = (1.0, 1.2, 1.4, 1.7, 2.0),
                   fracs: Optional[Sequence[float]] = None, device=None) -> list:
    """Autoguidance by the run's own earlier EMA snapshots over a sweep of w (SCT Sec. 4.4 [RECON]).

    ``score(guide, w) -> dict`` scores ``model`` guided by ``guide`` with strength w (e.g. a
    :func:`fid_report` or :func:`evaluate_digits` call with ``guide=guide, w=w``). Returns rows
    ``{'frac', 'w', **score}``: one unguided row (frac None, w = 1), then every snapshot fraction x w != 1.
    """
    from .checkpoints import load_model

    paths = snapshot_paths(run_dir)
    fracs = sorted(paths) if fracs is None else [float(f) for f in fracs]
    missing = [f for f in fracs if f not in paths]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no EMA snapshot at fraction(s) {missing}; found {sorted(paths)}")
    if isinstance(model, nn.Module):
        device = device or next(model.parameters()).device
    rows = [{"frac": None, "w": 1.0, **score(None, 1.0)}]
    for f in fracs:
        guide, _ = load_model(str(paths[f]).replace(".safetensors", ""), map_location=device or "cpu")
        guide = guide.eval()
        rows += [{"frac": f, "w": float(w), **score(guide, float(w))} for w in ws if float(w) != 1.0]
    return rows


def make_eval_fn(cfg, *, num_samples: int = 500, seed: int = 0, steps=None):
    """An ``eval_fn(model, nimg) -> dict`` for :func:`sctlib.train.train` (metric curves over training)."""
    dataset = None
    if cfg.dataset.startswith("toy2d"):
        from .data import load_dataset

        dataset = load_dataset(cfg.dataset, seed=cfg.seed)

    def eval_fn(model, nimg):
        was = model.training
        model.eval()
        try:
            return evaluate(model, cfg, num_samples=num_samples, seed=seed, steps=steps, dataset=dataset)
        finally:
            model.train(was)

    return eval_fn


def seeded_generator(model: Callable, shape: Sequence[int], *, steps: int = 1, mid_t: Sequence[float] = (0.821,),
                     t_max: float = 80.0, label_dim: int = 0, device=None, guide: Optional[Callable] = None,
                     w: float = 1.0, sampler: str = "cm", sample_fn: Optional[Callable] = None):
    """``generate(seeds) -> uint8 images``: image i comes from its own seed (EDM ``generate.py`` convention).

    The seed fixes the latent, the class label (uniform over ``label_dim``) and any re-noising draw, so a
    FID over seeds 0..N-1 is reproducible and a single image can be regenerated from its seed.
    """
    from .data import to_uint8

    if isinstance(model, nn.Module):
        device = device or next(model.parameters()).device
    device = torch.device(device or "cpu")
    f = model if guide is None else samplers.guided(model, guide, w)

    @torch.no_grad()
    def generate(seeds: torch.Tensor) -> torch.Tensor:
        noise, labels = [], []
        for s in seeds.tolist():
            g = torch.Generator().manual_seed(int(s))
            noise.append(torch.randn(tuple(shape), generator=g))
            if label_dim:
                labels.append(int(torch.randint(label_dim, (1,), generator=g)))
        noise = torch.stack(noise).to(device)
        lab = torch.as_tensor(labels, device=device) if label_dim else None
        g = torch.Generator(device=device).manual_seed(int(seeds[0]) + 0x5A17)  # re-noising draws of this batch
        if sample_fn is not None:
            x = sample_fn(f, noise, lab, steps=steps, generator=g)
        elif sampler == "heun":
            x = samplers.sample_heun(f, noise, lab, num_steps=steps, sigma_max=t_max)
        elif steps == 1:
            x = samplers.sample_onestep(f, noise, lab, t_max=t_max, generator=g)
        else:
            x = samplers.sample_multistep(f, noise, lab, t_steps=(t_max, *mid_t[: steps - 1]), generator=g)
        return to_uint8(x)

    return generate


def fid_report(model, cfg, ref_stats, *, num_images: Optional[int] = None, seeds: Sequence[int] = (0, 1, 2),
               steps: Optional[Sequence[int]] = None, weights_path=None, extractor=None, batch_size: int = 250,
               guide=None, w: float = 1.0, device=None, progress: bool = True, sampler: str = "auto") -> dict:
    """FID (mean, sd, min over seed sets) for 1- and multi-step sampling of a run's model.

    ``cfg`` is the run's TrainConfig (image shape, labels, ``eval.mid_t``, ``eval.t_max``); ``ref_stats`` from
    :func:`sctlib.metrics.inception_reference_stats` (or a path to an .npz with mu/sigma). The sampler is
    :func:`sampler_for` ``(cfg, sampler)`` (phased sampling for a phased model); ``steps`` defaults to its
    ``default_steps``.
    """
    shape = (cfg.net.img_channels, cfg.net.img_resolution, cfg.net.img_resolution)
    sample_fn = sampler_for(cfg, sampler)
    out = {}
    for k in (tuple(steps) if steps is not None else sample_fn.default_steps):
        gen = seeded_generator(model, shape, steps=k, mid_t=cfg.eval.mid_t, t_max=cfg.eval.t_max,
                               label_dim=cfg.net.label_dim if cfg.cond else 0, device=device, guide=guide, w=w,
                               sample_fn=sample_fn)
        out[f"fid_{k}step"] = metrics.fid_multi_seed(gen, ref_stats, num_images=num_images or cfg.eval.num_samples,
                                                     seeds=seeds, weights_path=weights_path, extractor=extractor,
                                                     batch_size=batch_size, device=device, progress=progress)
    return out


def train_and_report(preset: str, run_dir, settings: Sequence[str] = (), *, nproc: int = 1, fid_images: int = 50_000,
                     fid_seeds: Sequence[int] = (0, 1, 2), steps: Optional[Sequence[int]] = None, inception_weights=None,
                     paper: Optional[dict] = None, progress: bool = True) -> dict:
    """The paper-scale pipeline: train (or resume) a preset, then FID of its EMA model; writes results.json.

    ``settings`` are ``key=value`` overrides (they must include ``data_path=``, the EDM zip that also gives
    the FID reference statistics). Training runs under torchrun when ``nproc > 1``; evaluation runs in this
    process on the first GPU (or the CPU). Returns the record written to ``run_dir/results.json``.
    """
    import json
    from pathlib import Path

    from . import book, train as train_mod

    cfg = train_mod.resolve_config(preset, list(settings))
    if not cfg.data_path:
        raise ValueError("settings must name the dataset zip (data_path=...): it also gives the FID reference")
    summary = train_mod.launch(preset, run_dir, list(settings), nproc=nproc, progress=progress)
    model, _ = train_mod.load_run(run_dir)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    ref = metrics.inception_reference_stats(cfg.data_path, weights_path=inception_weights or None, progress=progress)
    report = fid_report(model, cfg, ref, num_images=fid_images, seeds=fid_seeds, steps=steps,
                        weights_path=inception_weights or None, progress=progress)
    book.write_results(run_dir, report, paper=paper,
                       extra={"preset": preset, "settings": list(settings), "train_summary": summary})
    return json.loads((Path(run_dir) / "results.json").read_text())
