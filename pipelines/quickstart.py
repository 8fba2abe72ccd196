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
# papermill pipelines/quickstart.ipynb out.ipynb -p teacher_nimg 384000 -p tune_nimg 192000 --log-output
# papermill pipelines/quickstart.ipynb out.ipynb -p smoke True      # the whole path in about a minute
# ```

# %% tags=["parameters"]
run_name: str = "quickstart"  # results go to runs/<run_name>/ (smoke mode: runs/<run_name>-smoke/)
smoke: bool = False  # True: the whole path in miniature (about a minute): tiny budgets, 200 samples
teacher_nimg: int = 256000  # teacher (EDM) training length in images
tune_nimg: int = 128000  # ECT and SCT tuning length in images (each)
model_channels: int = 16  # width of the DDPM++ (16 -> 0.18M parameters)
num_samples: int = 1000  # samples per evaluation
seed: int = 0  # seed of the data order, the initial weights and the samples
device: str = "cpu"  # 'cpu' or 'cuda'

# %%
import json
from dataclasses import replace

import matplotlib.pyplot as plt
from IPython.display import display

import sctlib as sct

sct.book.setup(seed)
smoke = sct.pipeline.smoke_enabled(smoke)
if smoke:
    run_name, teacher_nimg, tune_nimg, num_samples = f"{run_name}-smoke", 5120, 5120, 200
root = sct.book.project_root() / "runs" / run_name
net = dict(model_channels=model_channels)


def preset(name, **kw):
    cfg = sct.config.get_preset(name)
    return sct.config.override(cfg, device=device, seed=seed, **{f"net.{k}": v for k, v in net.items()}, **kw)


# %% [markdown]
# ## 1. The diffusion teacher

# %%
teacher_cfg = preset("digits-edm", total_nimg=teacher_nimg, checkpoint_nimg=teacher_nimg // 4)
if smoke:  # stop half-way and start again, as after a pre-emption: the second call resumes
    sct.train.train(replace(teacher_cfg, total_nimg=teacher_nimg // 2), root / "teacher")
teacher_summary = sct.train.train(teacher_cfg, root / "teacher")
print(f"teacher: {teacher_summary['nimg']:,} images in {teacher_summary['wall_s']:.0f} s")

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
    print(f"{task.upper()}: {runs[task][1]['nimg']:,} images in {runs[task][1]['wall_s']:.0f} s")

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
display(sct.book.record_table(results, caption="FD (digits features, lower is better) and class accuracy"))

# %%
_ = sct.book.write_results(root, results, extra={
    "settings": dict(teacher_nimg=teacher_nimg, tune_nimg=tune_nimg, model_channels=model_channels,
                     num_samples=num_samples, seed=seed, device=device),
    "wall_s": {"teacher": round(teacher_summary["wall_s"], 1), **{k: round(v[1]["wall_s"], 1) for k, v in runs.items()}},
})

# %% [markdown]
# ## 4. Training curves: loss, metric over training, and the target residual per t

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
sct.book.plot_training([root / "ect", root / "sct"], ["ECT", "SCT"], ax=axes[0])
for task in ("ect", "sct"):
    rows = [json.loads(line) for line in (root / task / "evals.jsonl").read_text().splitlines()]
    axes[1].plot([r["nimg"] for r in rows], [r["fd_1step"] for r in rows], marker="o", label=f"{task.upper()} 1 step")
    axes[1].plot([r["nimg"] for r in rows], [r["fd_2step"] for r in rows], marker="s", ls="--",
                 label=f"{task.upper()} 2 steps")
axes[1].set_xlabel("images seen")
axes[1].set_ylabel("FD (digits features)")
axes[1].legend()
sct.book.plot_residual_by_t([root / "ect", root / "sct"], ["ECT", "SCT"], ax=axes[2])
for ax in axes[:2]:
    ax.ticklabel_format(axis="x", style="sci", scilimits=(3, 3))
fig.tight_layout()
fig.savefig(root / "curves.png", dpi=120)
plt.show()

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
for ax, task, title in zip(axes, ("teacher", "ect", "sct"), ("teacher: Heun, 18 steps", "ECT: 1 step (top), 2 steps (bottom)",
                                                             "SCT: 1 step (top), 2 steps (bottom)")):
    ax.imshow(plt.imread(root / task / "samples" / "final.png"), cmap="gray")
    ax.set_title(title)
    ax.axis("off")
fig.tight_layout()
fig.savefig(root / "samples.png", dpi=120)
plt.show()
