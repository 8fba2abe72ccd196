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
# # Ablation: ECT, the stable target, the smooth schedule, SCT (one arm x one seed per run)
#
# From one teacher, on one data set and budget, train one arm with one seed and record FID (real Inception)
# at 1 and 2 steps on the EMA model against images seen, with the gradient spread and the trainer's per-t
# target-variance diagnostics. Arms (see `sctlib.ablation`): `ect`; `ect_target` (stable target only);
# `ect_smooth` (smooth schedule only, ending at ECT's final Delta t); `sct` (both). Run each arm with three
# seeds, then combine the `results.json` files with `sct.ablation.aggregate_arms`.
#
# ```
# python -m sctlib.data natural datasets/natural-32.zip --resolution 32
# papermill pipelines/ablation.ipynb runs/abl-sct-s0.ipynb -p arm sct -p seed 0 -p run_name abl-sct-s0 \
#     -p teacher runs/natural-teacher -p data_path datasets/natural-32.zip
# ```
#
# Re-running the same command resumes the run and keeps the evaluations already made.

# %% tags=["parameters"]
arm: str = "sct"  # ect | ect_target | ect_smooth | sct
seed: int = 0  # training seed (three per arm)
teacher: str = ""  # a run folder or .safetensors of the diffusion teacher (empty: from scratch, smoke only)
data_path: str = "datasets/natural-32.zip"  # EDM-format zip (python -m sctlib.data natural ...)
base_preset: str = "cifar10-ect"  # preset the arm's overrides apply to
overrides: str = ""  # extra settings as space-separated items of the form key equals value
ref_source: str = ""  # stable-target arms: batch, all, bank or dataset (empty: the preset's)
total_nimg: int = 2_000_000  # training length in images
eval_nimg: str = "250000,500000,1000000,1500000,2000000"  # FID points in images seen, comma-separated
fid_images: int = 10_000  # generated images per FID
fid_ref_images: int = 0  # data images for the reference statistics (0 means all)
inception_weights: str = ""  # empty: the installed default (python -m sctlib.metrics install-inception)
run_name: str = ""  # runs/<run_name>/ (default: abl-<arm>-s<seed>)
runs_dir: str = ""  # where runs go (default: <repository>/runs)
smoke: bool = False  # tiny CPU settings on 64 digits images (plumbing only); the environment variable SCTLIB_SMOKE sets it too

# %%
import json
from pathlib import Path

import sctlib as sct

sct.book.setup(seed)
root = sct.book.project_root()
# Relative paths are read from the repository root (the notebook itself runs in pipelines/).
abs_path = lambda p: str(root / p) if p and not Path(p).is_absolute() else p  # noqa: E731
overrides = sct.pipeline.parse_overrides(overrides)
args = dict(overrides=list(overrides), total_nimg=total_nimg, eval_nimg=sct.pipeline.parse_list(eval_nimg),
            fid_images=fid_images, fid_ref_images=fid_ref_images)
smoke = sct.pipeline.smoke_enabled(smoke)
run_name = run_name or f"abl-{arm}-s{seed}" + ("-smoke" if smoke else "")
if smoke:
    small = sct.ablation.smoke_params()
    args.update(small, overrides=small["overrides"] + list(overrides))
    if not Path(abs_path(data_path)).exists():  # no data set here (as in CI): 64 digits images stand in
        si = sct.pipeline.smoke_inputs("cifar10", Path(runs_dir or root / "runs") / run_name / "smoke-inputs")
        data_path, inception_weights = si["data_path"], inception_weights or si["inception_weights"]
        print(si["fid_note"])
print(f"arm {arm}, seed {seed}: overrides {sct.ablation.arm_overrides(arm, ref_source)} on {base_preset}")
print(json.dumps(args, indent=1))

# %% [markdown]
# ## Training with FID and gradient spread at each evaluation point

# %%
record = sct.ablation.run_arm(arm, seed=seed, data_path=abs_path(data_path), base_preset=base_preset,
                              teacher=abs_path(teacher), ref_source=ref_source, run_name=run_name,
                              runs_dir=runs_dir or root / "runs", inception_weights=inception_weights or None,
                              progress=not smoke, **args)
for point in record["results"]["curve"]:
    print(f"{point['eval_point']:>12,d} images: FID 1 step {point['fid_1step']:.3f}, 2 steps {point['fid_2step']:.3f}, "
          f"grad var {point['grad_var_trace']:.4g}")
if record["dropped_overrides"]:
    print("not available in this sctlib (run without):", record["dropped_overrides"])

# %% [markdown]
# ## Target-variance diagnostics logged by the trainer (last tick)

# %%
last = record["results"]["stats"][-1]
print(json.dumps({k: last[k] for k in ("nimg", "loss", "loss_std", "residual_var") if k in last}, indent=1))
