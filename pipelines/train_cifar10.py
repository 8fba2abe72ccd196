# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # CIFAR-10: ECT or SCT tuning of EDM's DDPM++, then FID-50k
#
# Full scale on GPUs. Prepare the data and the teacher on a connected machine first:
#
# ```
# python -m sctlib.data convert cifar10 cifar-10-python.tar.gz datasets/cifar10-32x32.zip
# # EDM's edm-cifar10-32x32-uncond-vp.pkl, and the Inception weights for FID (see the README)
# papermill pipelines/train_cifar10.ipynb runs/cifar10-sct.ipynb -p preset cifar10-sct -p nproc 4 --log-output
# ```
#
# Try it first in miniature on any CPU (a few minutes; the whole path: train, checkpoint, resume, sample,
# FID): `papermill pipelines/train_cifar10.ipynb out.ipynb -p smoke True --log-output`.
# On a machine without a CUDA GPU the full preset refuses to start (`-p allow_cpu True` overrides that).
# Extra config settings go in one string: `-p overrides "total_nimg=12800000 loss.q=4"`.
# The run is resumable: executing the notebook again continues from the last checkpoint. Progress is
# printed as text lines (images seen, img/s, loss, ETA), so it shows in papermill's log and in the saved
# notebook. The results are compared with the paper's matching rows (`sctlib.paper`: same dataset, model
# size and training length); the SCT rows come from a third-party text extraction of the paper's tables.

# %% tags=["parameters"]
preset: str = "cifar10-sct"  # cifar10-ect | cifar10-sct
smoke: bool = False  # True: the whole pipeline in miniature on a CPU (tiny net, 64 digits images), a few minutes
allow_cpu: bool = False  # True: start a GPU-scale preset even when no CUDA GPU is visible
run_name: str = ""  # results go to <runs_dir>/<run_name>/ (default: the preset name, + '-smoke' in smoke mode)
runs_dir: str = ""  # folder of the runs (default: <repository>/runs)
data_path: str = "datasets/cifar10-32x32.zip"  # EDM-format zip (python -m sctlib.data convert ...)
init: str = "edm-cifar10-32x32-uncond-vp.pkl"  # teacher: EDM/EDM2 pickle, ECT pickle, or an sctlib run folder
nproc: int = 1  # GPUs on this node (torchrun when > 1)
overrides: str = ""  # extra config settings: space-separated key-value items (see above)
fid_images: int = 50000  # generated images per FID
fid_seeds: str = "0,1,2"  # comma-separated seed sets; reported as mean, sd and min
steps: str = "1,2"  # comma-separated sampling step counts to score
inception_weights: str = ""  # Inception weights file (else $SCTLIB_INCEPTION_WEIGHTS or the cache)

# %%
import json
from pathlib import Path

from IPython.display import Image, display

import sctlib as sct

sct.book.setup(0)
root = sct.book.project_root()
smoke = sct.pipeline.smoke_enabled(smoke)
run_dir = Path(runs_dir or root / "runs") / (run_name or (f"{preset}-smoke" if smoke else preset))
# Relative paths are read from the repository root (the notebook itself runs in pipelines/).
abs_path = lambda p: str(root / p) if p and not Path(p).is_absolute() else p  # noqa: E731
user = sct.pipeline.parse_overrides(overrides)
fid_seeds, steps = sct.pipeline.parse_list(fid_seeds), sct.pipeline.parse_list(steps)
settings = [f"data_path={abs_path(data_path)}", f"init={abs_path(init)}", *user]
full_cfg = sct.train.resolve_config(preset, settings)  # the preset as it would run at full scale
fid_note = "Inception weights: " + (inception_weights or "$SCTLIB_INCEPTION_WEIGHTS or the cache")
if smoke:
    si = sct.pipeline.smoke_inputs("cifar10", run_dir / "smoke-inputs")
    settings = [f"data_path={si['data_path']}", "init=", *si["overrides"], *user]
    inception_weights = inception_weights or si["inception_weights"]
    fid_images, fid_seeds, fid_note = min(fid_images, 8), fid_seeds[:2], si["fid_note"]
cfg = sct.train.resolve_config(preset, settings)
sct.pipeline.check_device(cfg, allow_cpu=allow_cpu)
print(f"{'SMOKE: ' if smoke else ''}{preset} -> {run_dir}")
print(f"{cfg.total_nimg:,} images at batch {cfg.batch_size}, {cfg.net.arch} with {cfg.net.model_channels} channels, "
      f"task {cfg.loss.task}, schedule {cfg.loss.schedule}, data {cfg.data_path}")
print(f"FID: {fid_images:,} images x seed sets {fid_seeds}, steps {steps}; {fid_note}")

# %% [markdown]
# ## The paper's matching numbers
#
# Chosen by `sctlib.paper.matching_rows` for the full-scale preset (in smoke mode too, for reference).

# %%
paper_rows = sct.paper.comparison(full_cfg, steps=steps)
display(sct.book.paper_table(paper_rows, caption=f"published FIDs matching {preset}"))

# %% [markdown]
# ## Training, then FID of the EMA model

# %%
if smoke:
    # Stop half-way and start again, as after a pre-emption: the second call resumes from the checkpoint.
    sct.train.launch(preset, run_dir, [*settings, f"total_nimg={cfg.total_nimg // 2}"], nproc=nproc)
    assert any((run_dir / "checkpoints").iterdir()), "no checkpoint written"
record = sct.evaluate.train_and_report(preset, run_dir, settings, nproc=nproc, fid_images=fid_images,
                                       fid_seeds=fid_seeds, steps=steps, inception_weights=inception_weights,
                                       paper=paper_rows)
record.update(smoke=smoke, fid_note=fid_note)
_ = (run_dir / "results.json").write_text(json.dumps(record, indent=2))

# %% [markdown]
# ## Ours next to the paper's

# %%
rows = []
for k in steps:
    r = record["results"].get(f"fid_{k}step", {})
    paper_k = [f"{p['fid']:g} ({p['label']}, {p['source']})" for p in paper_rows if p["steps"] == k]
    rows.append([k, r.get("mean"), r.get("sd"), r.get("min"), "; ".join(paper_k) or "no matching row"])
display(sct.book.Table(rows, ["steps", "FID mean", "sd", "min", "paper"],
                       caption=f"{'SMOKE (meaningless numbers): ' if smoke else ''}{preset}, "
                               f"{fid_images:,} images per FID"))
final = run_dir / "samples" / "final.png"
if final.exists():
    display(Image(filename=str(final), width=480))
