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
# # Quickstart: teacher → ECT and SCT on sklearn's digits
#
# The main job on the embedded default. A small class-conditional DDPM++ is pre-trained as a diffusion
# teacher (EDM loss), then tuned into a consistency model twice with the same budget: once with ECT's
# single-sample target and staircase schedule, once with SCT's score-identity target and smooth schedule.
# Both are scored with 1 and 2 sampling steps: Fréchet distance in the feature space of a digits
# classifier (lower is better) and the classifier's accuracy on the requested class.
#
# ```
# papermill pipelines/quickstart.ipynb out.ipynb -p teacher_nimg 384000 -p tune_nimg 192000
# ```

# %% tags=["parameters"]
run_name = "quickstart"      # results go to runs/<run_name>/
teacher_nimg = 256_000       # teacher (EDM) training length in images
tune_nimg = 128_000          # ECT and SCT tuning length in images (each)
model_channels = 16          # width of the DDPM++ (16 -> 0.18M parameters)
num_samples = 1000           # samples per evaluation
seed = 0
device = "cpu"

# %%
import json
from dataclasses import replace

import matplotlib.pyplot as plt

import sctlib as sct

sct.book.setup(seed)
root = sct.book.project_root() / "runs" / run_name
net = dict(model_channels=model_channels)


def preset(name, **kw):
    cfg = sct.config.get_preset(name)
    return sct.config.override(cfg, device=device, seed=seed, **{f"net.{k}": v for k, v in net.items()}, **kw)


# %% [markdown]
# ## 1. The diffusion teacher

# %%
teacher_cfg = preset("digits-edm", total_nimg=teacher_nimg, checkpoint_nimg=teacher_nimg // 4)
teacher_summary = sct.train.train(teacher_cfg, root / "teacher")
print(json.dumps({k: v for k, v in teacher_summary.items() if k != "last_tick"}, indent=1))

# %% [markdown]
# ## 2. ECT and SCT tunings from the teacher, same budget

# %%
runs = {}
for task in ("ect", "sct"):
    cfg = preset(f"digits-{task}", total_nimg=tune_nimg, checkpoint_nimg=tune_nimg // 4,
                 init=str(root / "teacher"), **{"loss.double_nimg": tune_nimg // 2})
    cfg = replace(cfg, eval=replace(cfg.eval, every_nimg=tune_nimg // 8))
    eval_fn = sct.evaluate.make_eval_fn(cfg, num_samples=min(num_samples, 500), seed=seed)
    runs[task] = (cfg, sct.train.train(cfg, root / task, eval_fn=eval_fn))
    print(task, runs[task][1]["wall_s"], "s")

# %% [markdown]
# ## 3. Scores with 1 and 2 steps (and the teacher with 18 Heun steps = 35 evaluations)

# %%
results = {}
model, _ = sct.train.load_run(root / "teacher")
results["teacher (Heun, 35 NFE)"] = sct.evaluate.evaluate(model, teacher_cfg, num_samples=num_samples, seed=seed)
results["teacher as 1-step CM"] = sct.evaluate.evaluate(model, teacher_cfg, num_samples=num_samples,
                                                        seed=seed, sampler="cm")
for task, (cfg, _) in runs.items():
    model, _ = sct.train.load_run(root / task)
    results[task.upper()] = sct.evaluate.evaluate(model, cfg, num_samples=num_samples, seed=seed)
print(json.dumps(results, indent=1))

# %%
sct.book.write_results(root, results, extra={
    "settings": dict(teacher_nimg=teacher_nimg, tune_nimg=tune_nimg, model_channels=model_channels,
                     num_samples=num_samples, seed=seed, device=device),
    "wall_s": {"teacher": teacher_summary["wall_s"], **{k: v[1]["wall_s"] for k, v in runs.items()}},
})

# %% [markdown]
# ## 4. Training curves: loss, metric over training, and the target residual per t

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
sct.book.plot_training([root / "ect", root / "sct"], ["ECT", "SCT"], ax=axes[0])
for task in ("ect", "sct"):
    rows = [json.loads(l) for l in (root / task / "evals.jsonl").read_text().splitlines()]
    axes[1].plot([r["nimg"] for r in rows], [r["fd_1step"] for r in rows], marker="o", label=f"{task.upper()} 1 step")
    axes[1].plot([r["nimg"] for r in rows], [r["fd_2step"] for r in rows], marker="s", ls="--", label=f"{task.upper()} 2 steps")
axes[1].set_xlabel("images seen"); axes[1].set_ylabel("FD (digits features)"); axes[1].legend()
sct.book.plot_residual_by_t([root / "ect", root / "sct"], ["ECT", "SCT"], ax=axes[2])
fig.tight_layout()
fig.savefig(root / "curves.png")

# %%
from IPython.display import Image, display

for task in ("teacher", "ect", "sct"):
    print(task)
    display(Image(filename=str(root / task / "samples" / "final.png")))
