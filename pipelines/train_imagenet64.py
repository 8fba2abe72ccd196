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
# # ImageNet-64: ECT or SCT tuning of EDM2, then FID-50k
#
# Full scale on GPUs. Prepare the data and the teacher on a connected machine first:
#
# ```
# python -m sctlib.data convert imagenet64 ILSVRC/Data/CLS-LOC/train datasets/edm2-imagenet-64x64.zip
# # EDM2's edm2-img64-s-1073741-0.075.pkl, and torch-fidelity's Inception weights (see the README)
# papermill pipelines/train_imagenet64.ipynb runs/imagenet64-s-sct.ipynb -p preset imagenet64-s-sct -p nproc 8
# ```
#
# The run is resumable: executing the notebook again continues from the last checkpoint.

# %% tags=["parameters"]
preset = "imagenet64-s-sct"                 # imagenet64-{s,m,l,xl}-{ect,sct}
run_name = ""                               # runs/<run_name>/ (default: the preset name)
runs_dir = ""                               # where runs go (default: <repository>/runs)
data_path = "datasets/edm2-imagenet-64x64.zip"  # EDM-format zip (python -m sctlib.data convert imagenet64 ...)
init = "edm2-img64-s-1073741-0.075.pkl"   # teacher: EDM2 pickle (post-hoc EMA), ECT pickle, or an sctlib run
nproc = 1                                   # GPUs on this node (torchrun when > 1)
overrides = []                              # extra key=value settings, e.g. ["total_nimg=12800000"]
fid_images = 50_000                         # images per FID
fid_seeds = [0, 1, 2]                       # seed sets: reported as mean, sd and min
inception_weights = ""                      # path to torch-fidelity's weights (else $SCTLIB_INCEPTION_WEIGHTS / cache)
steps = [1, 2]                              # sampling steps to score
paper = {"SCT fid_1step (abstract)": 2.42, "SCT fid_2step (abstract)": 1.55}  # [V-paper]; model size [MISSING]

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
