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
# # EDM's edm-cifar10-32x32-uncond-vp.pkl, and torch-fidelity's Inception weights (see the README)
# papermill pipelines/train_cifar10.ipynb runs/cifar10-sct.ipynb -p preset cifar10-sct -p nproc 4
# ```
#
# The run is resumable: executing the notebook again continues from the last checkpoint.

# %% tags=["parameters"]
preset = "cifar10-sct"                      # cifar10-ect | cifar10-sct
run_name = ""                               # runs/<run_name>/ (default: the preset name)
runs_dir = ""                               # where runs go (default: <repository>/runs)
data_path = "datasets/cifar10-32x32.zip"    # EDM-format zip (python -m sctlib.data convert cifar10 ...)
init = "edm-cifar10-32x32-uncond-vp.pkl"    # teacher: EDM pickle, ECT pickle, or an sctlib run
nproc = 1                                   # GPUs on this node (torchrun when > 1)
overrides = []                              # extra key=value settings, e.g. ["total_nimg=12800000"]
fid_images = 50_000                         # images per FID
fid_seeds = [0, 1, 2]                       # seed sets: reported as mean, sd and min
inception_weights = ""                      # path to torch-fidelity's weights (else $SCTLIB_INCEPTION_WEIGHTS / cache)
steps = [1, 2]                              # sampling steps to score
paper = {"ECT fid_1step (400k it)": 3.60, "ECT fid_2step (400k it)": 2.11}  # ECT README [V-code]; SCT: [MISSING]

# %%
import json
from pathlib import Path

import sctlib as sct

sct.book.setup(0)
root = sct.book.project_root()
run_dir = Path(runs_dir or root / "runs") / (run_name or preset)
# Relative paths are read from the repository root (the notebook itself runs in pipelines/).
abs_path = lambda p: str(root / p) if p and not Path(p).is_absolute() else p  # noqa: E731
settings = [f"data_path={abs_path(data_path)}", f"init={abs_path(init)}", *overrides]
print(json.dumps(sct.config.to_dict(sct.train.resolve_config(preset, settings)), indent=1))

# %% [markdown]
# ## Training, then FID of the EMA model with 1 and 2 steps

# %%
record = sct.evaluate.train_and_report(preset, run_dir, settings, nproc=nproc, fid_images=fid_images,
                                       fid_seeds=fid_seeds, steps=steps, inception_weights=inception_weights,
                                       paper=paper)
print(json.dumps(record["results"], indent=1))
