"""Frozen configuration dataclasses and the one table of named presets (EDM2 style).

Pure data: this module imports no torch. Progress is counted in images seen (``*_nimg``); a change of
batch size or GPU count therefore leaves the curriculum unchanged. Paper-scale values come from
the official ECT scripts (github.com/locuslab/ect: ``run_ecm.sh`` for CIFAR-10, ``run_imgnet_ecm.sh`` on
its ``imgnet`` branch); SCT-specific values are reconstructions of arXiv 2410.18958 Sec. 4 (see the book's
page *The paper*) and are marked [RECON] beside the field.

Overrides go through :func:`override` (``key=value`` strings from the CLI, dotted for nested configs,
e.g. ``loss.q=4``) which validates names and types and lists the valid ones on error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Tuple

from .errors import UserError

__all__ = [
    "NetConfig",
    "LossConfig",
    "OptimConfig",
    "EvalConfig",
    "TrainConfig",
    "PRESETS",
    "get_preset",
    "override",
    "parse_overrides",
    "to_dict",
    "from_dict",
    "ConfigError",
    "validate",
]


class ConfigError(UserError, ValueError):
    """A bad preset name, override key or value; the message lists the valid choices."""


@dataclass(frozen=True)
class NetConfig:
    arch: str = "ddpmpp"                       # 'ddpmpp' (EDM SongUNet), 'edm2' (magnitude-preserving UNet), 'mlp' (2-D toys)
    img_resolution: int = 32                   # H = W in pixels; for 'mlp' the data dimension
    img_channels: int = 3                      # image channels (1 for digits)
    label_dim: int = 0                         # number of classes; 0 = unconditional
    model_channels: int = 128                  # base width (DDPM++ 128; EDM2 192/256/320/384; mlp hidden width)
    channel_mult: Tuple[int, ...] = (2, 2, 2)  # per-resolution width multipliers
    num_blocks: int = 4                        # residual blocks per resolution (mlp: hidden layers)
    attn_resolutions: Tuple[int, ...] = (16,)  # resolutions with self-attention
    dropout: float = 0.0                       # dropout probability (ECT CIFAR 0.2; EDM2-S 0.40, M/L/XL 0.50)
    dropout_res: int = 0                       # ECT's EDM2 patch: dropout only at resolution <= dropout_res (0 = everywhere)
    sigma_data: float = 0.5                    # EDM sigma_data
    sigma_min: float = 0.002                   # boundary of the consistency function (ECT CIFAR uses 0.003)
    boundary: str = "never"                    # where the boundary c_skip/c_out apply: 'never' | 'eval' | 'always'


@dataclass(frozen=True)
class LossConfig:
    task: str = "ect"                          # 'edm' (diffusion teacher), 'ect', 'sct'
    P_mean: float = -1.1                       # log-normal t: ln t ~ N(P_mean, P_std^2)
    P_std: float = 2.0
    sigma_data: float = 0.5
    mapping: str = "sigmoid"                   # ECT r(t) mapping: 'sigmoid' | 'const'
    q: float = 2.0                             # Delta t shrinks by q per stage
    k: float = 8.0                             # sigmoid mapping: n(t) = 1 + k sigmoid(-b t)
    b: float = 1.0
    schedule: str = "staircase"                # 'staircase' (ECT) | 'smooth' (SCT, [RECON] continuous exponent)
    # Where the smooth schedule ends. 'ect': a = max(1, nimg / double_nimg), equal to ECT's staircase at
    # every stage END, so a run of total_nimg = S * double_nimg ends at ECT's final Delta t (2^-8 on
    # CIFAR-10, 4^-4 on ImageNet-64). 'beyond': a = 1 + nimg / double_nimg, equal at every stage START,
    # ending one stage past ECT (2^-9, 4^-5; the behaviour before 'smooth_end' existed). Default 'ect':
    # an ECT-vs-SCT ablation then compares curricula with the same final Delta t, so switching the
    # schedule alone (or the target alone) changes one ingredient, not the difficulty of the last stage.
    smooth_end: str = "ect"
    double_nimg: int = 3_200_000               # images per stage ("double" = 250 ticks x 12.8 kimg in run_ecm.sh)
    c: float = 0.0                             # pseudo-Huber constant (0 = plain L2 norm)
    weighting: str = "inv_dt"                  # 'inv_dt' = 1/(t-r) | 'snrpk' = 1/t^2 + 1/sigma_data^2 | 'edm' | 'uniform'
    edges: Tuple[float, ...] = (0.0,)          # phase edges s_0 < s_1 < ...; (0,) = one phase [RECON for >1]
    # SCT reference set [RECON]: 'batch' (the micro-batch) | 'all' (the step's global batch: all ranks and
    # micro-batches) | 'bank' (the micro-batch + a FIFO bank of this process's earlier micro-batches, so it depends on
    # the process split) | 'dataset' (the whole training set, on the device as uint8, streamed in chunks;
    # class-restricted for conditional models)
    ref_source: str = "batch"
    ref_size: int = 0                          # 'bank': capacity in images; 'dataset': fixed random subset (0 = all)
    ref_per_class: int = 0                     # 'bank': class-balanced bank with this many images per class (0 = off)
    ref_conditional: bool = True               # restrict references to the sample's class when labels exist
    ref_chunk: int = 1024                      # references per chunk in the posterior-mean softmax
    # Arithmetic of ref_source='dataset' (sctlib.references.DatasetReferences): 'float64' = every distance,
    # the log-sum-exp and the weighted sum in float64 (exact; the default); 'mixed' = float32 screening of
    # every reference (TF32 forced off) + the top-16 logits of each row recomputed exactly in float64 + the
    # own image exact, agreeing with 'float64' to <= 1e-3 of ||x_t - x0_hat|| over t in [0.002, 80] (tests;
    # 2e-6 measured on an H200). Why float64 stays the default: on one H200 (benchmarks/reference_cost.py,
    # batch 128, measured while other training processes shared the GPU, so indicative only) the CIFAR-10
    # call over 50,000 references took 5.3 ms in float64 and 9.2 ms in 'mixed' (which launches ~5x more
    # kernels; its kernel time was about half), and the per-class ImageNet-64 call 46 vs 43 ms: no clear
    # gain to pay for an approximation. Re-measure alone on a GPU before switching.
    ref_compute: str = "float64"


@dataclass(frozen=True)
class OptimConfig:
    name: str = "radam"                        # 'adam' | 'radam'
    lr: float = 1e-4                           # reference learning rate
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_schedule: str = "constant"              # 'constant' | 'inv_sqrt' (EDM2: lr / sqrt(max(nimg / lr_ref_nimg, 1)))
    lr_ref_nimg: int = 256_000                 # EDM2 decay point: ref_batches (2000) x batch (128)
    lr_rampup_nimg: int = 0                    # linear warm-up length in images
    grad_clip: float = 0.0                     # max global grad norm; 0 = off (as in ECT)
    # 'foreach' (PyTorch's multi-tensor kernels) | 'fused' (one fused kernel per group; Adam only: PyTorch has no
    # fused RAdam). Same update rule, other rounding order. On EDM2-S it was not faster (280.3 vs 279.4 img/s,
    # benchmarks/results/h200_throughput_fused_adam.json), so 'foreach' stays the default.
    impl: str = "foreach"


@dataclass(frozen=True)
class EvalConfig:
    mid_t: Tuple[float, ...] = (0.821,)        # intermediate times of the 2-step sampler (CIFAR 0.821, IN-64 1.526)
    t_max: float = 80.0                        # starting noise level of the samplers
    num_samples: int = 1000                    # samples per evaluation
    metric: str = "auto"                       # 'auto' picks by dataset: 'fd_digits', 'toy', 'fid'
    every_nimg: int = 0                        # evaluation period in images (0 = only at the end)
    eta: float = 0.0                           # edge skipping of phased models (SCT Sec. 4.4 [RECON]): 0 = stop at each edge


@dataclass(frozen=True)
class TrainConfig:
    name: str = "custom"
    dataset: str = "digits"                    # 'digits', 'toy2d-<name>', 'edmzip' (data_path), 'cifar10', 'imagenet64'
    data_path: str = ""                        # EDM-format zip for real datasets
    data_resolution: int = 0                   # resize the embedded digits (0 = native 8x8)
    cond: bool = False                         # train class-conditionally
    net: NetConfig = field(default_factory=NetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: str = ""                             # '' = scratch; a run dir, our .safetensors, or an EDM/EDM2/ECT .pkl/.pt
    init_ema: bool = True                      # start from the EMA weights of the init checkpoint when it has them
    total_nimg: int = 25_600_000               # training length in images
    batch_size: int = 128                      # global batch
    batch_gpu: int = 0                         # micro-batch per process (0 = batch_size / world)
    seed: int = 0
    device: str = "auto"                       # 'auto' | 'cpu' | 'cuda'
    # 'auto' (bf16 on CUDA, fp32 on CPU) | 'fp32' (TF32 off) | 'tf32' | 'bf16' | 'fp16' (autocast + GradScaler)
    # | a switch by stage exponent a, e.g. 'bf16,tf32@stage>=6' (syntax and rationale: sctlib/precision.py).
    # 'auto' is bf16 on CUDA; the paper-scale presets use a switch measured by the precision benchmark (below).
    precision: str = "auto"
    tf32: bool = True                          # TF32 for the float32 ops left alone under bf16/fp16 autocast (CUDA)
    cudnn_benchmark: bool = True               # let cuDNN pick the fastest conv algorithms (ECT's --bench)
    compile: bool = False                      # torch.compile the network (applied on CUDA only)
    compile_mode: str = "default"              # torch.compile mode: 'default' | 'max-autotune-no-cudagraphs' | ...
    channels_last: bool = False                # memory format on CUDA
    # DDP gradient bucket size in MiB; 0 = PyTorch's default (25 MiB after a 1 MiB first bucket; any explicit value
    # also sizes the first bucket). Under torch.compile, DDP splits the compiled graph at bucket boundaries so that
    # communication overlaps the backward pass: larger buckets, fewer graph pieces.
    ddp_bucket_mb: float = 0.0
    # How several processes combine their gradients: 'ddp' = DistributedDataParallel (all-reduces overlap the
    # backward pass, but under torch.compile it splits the compiled graph at bucket boundaries); 'allreduce' = one
    # all-reduce of the whole gradient after the backward pass (no overlap, the compiled graph of one process kept
    # whole). Same mean gradient either way, up to the order of the floating-point sums.
    grad_sync: str = "ddp"
    ema_halflife_nimg: int = 500_000           # traditional EMA half-life in images (0 = no EMA)
    ema_rampup_ratio: float = 0.0              # EDM ramp-up: half-life <= ratio * nimg (0 = off)
    phema_stds: Tuple[float, ...] = ()         # EDM2 power-function EMA sigma_rel values (ECT IN-64: 0.010, 0.050, 0.100)
    tick_nimg: int = 12_800                    # stats / progress period in images
    checkpoint_nimg: int = 0                   # checkpoint period in images (0 = only at the end)
    keep_checkpoints: int = 2                  # last K checkpoints kept (snapshots/ is never pruned)
    snapshot_fracs: Tuple[float, ...] = (0.25, 0.5, 0.75)  # EMA snapshots at these fractions of total_nimg (autoguidance)
    sample_nimg: int = 0                       # PNG sample-grid period in images (0 = start and end)
    max_nonfinite_steps: int = 10              # stop after this many consecutive non-finite steps
    workers: int = 0                           # DataLoader workers for real datasets
    # Decode a real image set into host memory (uint8) before training: CIFAR-10 150 MiB, ImageNet-64 15.7 GB. Without it
    # each image is decoded on first use and cached per process, so the first pass over the data (and any run
    # shorter than one) pays the decoding in the step (with workers=0, in the training process itself).
    data_preload: bool = False
    # Decode the set into one uint8 tensor on the training device and gather each batch there (no DataLoader, no
    # per-step host work; CIFAR-10 150 MiB, ImageNet-64 15.7 GB of GPU memory per process). Implies data_preload.
    data_on_device: bool = False


# ------------------------------------------------------------------------------------------------
# Presets: one table. Embedded presets run on a CPU in minutes; paper-scale ones follow the ECT scripts.

_DIGITS_NET = NetConfig(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=32,
                        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.1)
_TOY_NET = NetConfig(arch="mlp", img_resolution=2, img_channels=1, model_channels=128, num_blocks=3,
                     channel_mult=(), attn_resolutions=(), dropout=0.0)
_DIGITS = dict(dataset="digits", cond=True, batch_size=128, tick_nimg=12_800, keep_checkpoints=2,
               ema_halflife_nimg=20_000, eval=EvalConfig(mid_t=(0.821,), num_samples=1000))
_TOY = dict(dataset="toy2d-ring", batch_size=256, tick_nimg=25_600, ema_halflife_nimg=25_000,
            eval=EvalConfig(mid_t=(0.5,), num_samples=2000))
# Tuning presets on embedded data: ECT's CIFAR recipe scaled to a short budget (2 stages of q = 2).
_SMALL_TUNE = LossConfig(task="ect", q=2.0, double_nimg=96_000, P_mean=-1.1, P_std=2.0, weighting="inv_dt")

_CIFAR_NET = NetConfig(arch="ddpmpp", img_resolution=32, img_channels=3, label_dim=0, model_channels=128,
                       channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.2,
                       sigma_min=0.003, boundary="eval")
_CIFAR = dict(dataset="cifar10", batch_size=128, total_nimg=25_600_000, tick_nimg=12_800,
              checkpoint_nimg=640_000, ema_halflife_nimg=887_184,  # beta 0.9999 at batch 128
              optim=OptimConfig(name="radam", lr=1e-4, betas=(0.9, 0.999)),
              eval=EvalConfig(mid_t=(0.821,), num_samples=50_000, metric="fid"),
              init="edm-cifar10-32x32-uncond-vp.pkl")
_CIFAR_LOSS = LossConfig(task="ect", P_mean=-1.1, P_std=2.0, q=2.0, k=8.0, b=1.0, mapping="sigmoid",
                         double_nimg=3_200_000, c=0.0, weighting="inv_dt")

_CIFAR_COND_NET = replace(_CIFAR_NET, label_dim=10)
# SCT's reference set [RECON]: the whole training set ('dataset', on the GPU as uint8: 150 MB), streamed in
# chunks of 8,192. Why not a batch: the ESS of the estimate (1 = ECT's single-sample target) measured with
# benchmarks/natural_ess.py on 6,044 32x32x3 crops of the photographs shipped with scikit-learn and
# scikit-image (stand-ins for CIFAR-10), mean (median) over 96 queries:
#     references     t = 0.5        t = 1          t = 2          t = 5
#     128 (batch)    1.97 (1.00)    2.36 (1.00)    3.58 (1.50)    11.6 (10.4)
#     2,048          17.5 (1.00)    20.2 (1.06)    30.8 (6.6)     114 (78)
#     6,044 (all)    43.6 (1.00)    62.4 (1.71)    77.5 (20.9)    331 (230)
# ESS grows with the number of references, so all 50,000 CIFAR-10 images give at least the last row.
_CIFAR_SCT_LOSS = replace(_CIFAR_LOSS, task="sct", schedule="smooth", ref_source="dataset", ref_chunk=8192)

# EDM2 ImageNet-64 presets as ECT uses them: (channels, ref lr, dropout).
_IMG64_SIZES = {"s": (192, 1e-3, 0.40), "m": (256, 9e-4, 0.50), "l": (320, 8e-4, 0.50), "xl": (384, 7e-4, 0.50)}
_IMG64_LOSS = LossConfig(task="ect", P_mean=-0.8, P_std=1.6, q=4.0, k=8.0, b=1.0, mapping="sigmoid",
                         double_nimg=3_200_000, c=0.06, weighting="snrpk", ref_source="all")


def _img64(size: str, task: str) -> "TrainConfig":
    channels, lr, dropout = _IMG64_SIZES[size]
    net = NetConfig(arch="edm2", img_resolution=64, img_channels=3, label_dim=1000, model_channels=channels,
                    channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), dropout=dropout,
                    dropout_res=16, boundary="never")
    return TrainConfig(
        name=f"imagenet64-{size}-{task}", dataset="imagenet64", cond=True, net=net,
        loss=replace(_IMG64_LOSS, task=task),
        optim=OptimConfig(name="adam", lr=lr, betas=(0.9, 0.99), lr_schedule="inv_sqrt", lr_ref_nimg=2000 * 128),
        eval=EvalConfig(mid_t=(1.526,), num_samples=50_000, metric="fid"),
        total_nimg=12_800_000, batch_size=128, tick_nimg=6_400, checkpoint_nimg=320_000,
        ema_halflife_nimg=887_184, phema_stds=(0.010, 0.050, 0.100),
        init=f"edm2-img64-{size}.pkl",
    )


PRESETS: dict = {
    # embedded: digits (8x8, 10 classes)
    "digits-edm": TrainConfig(name="digits-edm", net=_DIGITS_NET, total_nimg=384_000,
                              loss=LossConfig(task="edm", P_mean=-1.2, P_std=1.2, weighting="edm"),
                              optim=OptimConfig(name="adam", lr=2e-3, betas=(0.9, 0.99)), **_DIGITS),
    "digits-ect": TrainConfig(name="digits-ect", net=replace(_DIGITS_NET, boundary="eval"), total_nimg=192_000,
                              loss=_SMALL_TUNE, optim=OptimConfig(name="radam", lr=5e-4), **_DIGITS),
    # SCT presets use the whole training set as references, per class for conditional models (see the
    # ESS measurements above _IMG64_LOSS). digits: ~180 references per class; measured on a conditional
    # run: ESS 1.0 for t < 0.3, ~2 at t ~ 0.5, ~35 at t ~ 1.5, ~180 for t > 3 (tests/test_train.py).
    "digits-sct": TrainConfig(name="digits-sct", net=replace(_DIGITS_NET, boundary="eval"), total_nimg=192_000,
                              loss=replace(_SMALL_TUNE, task="sct", schedule="smooth", ref_source="dataset"),
                              optim=OptimConfig(name="radam", lr=5e-4), **_DIGITS),
    # embedded: 2-D mixtures
    "toy2d-edm": TrainConfig(name="toy2d-edm", net=_TOY_NET, total_nimg=1_280_000,
                             loss=LossConfig(task="edm", P_mean=-1.2, P_std=1.2, weighting="edm"),
                             optim=OptimConfig(name="adam", lr=2e-3, betas=(0.9, 0.99)), **_TOY),
    "toy2d-ect": TrainConfig(name="toy2d-ect", net=replace(_TOY_NET, boundary="eval"), total_nimg=640_000,
                             loss=replace(_SMALL_TUNE, double_nimg=160_000),
                             optim=OptimConfig(name="radam", lr=5e-4), **_TOY),
    "toy2d-sct": TrainConfig(name="toy2d-sct", net=replace(_TOY_NET, boundary="eval"), total_nimg=640_000,
                             loss=replace(_SMALL_TUNE, double_nimg=160_000, task="sct", schedule="smooth",
                                          ref_source="bank", ref_size=4096),
                             optim=OptimConfig(name="radam", lr=5e-4), **_TOY),
    # paper scale: CIFAR-10 (run_ecm.sh) and ImageNet-64 (run_imgnet_ecm.sh)
    "cifar10-ect": TrainConfig(name="cifar10-ect", net=_CIFAR_NET, loss=_CIFAR_LOSS, **_CIFAR),
    "cifar10-sct": TrainConfig(name="cifar10-sct", net=_CIFAR_NET, loss=_CIFAR_SCT_LOSS, **_CIFAR),
    # Class-conditional CIFAR-10 (SCT reports Cond-SCT 3.03 / 1.88 FID at 1 / 2 steps, third-party text
    # extraction of its Table 2): EDM's conditional VP teacher, references from the sample's own class
    # (5,000 images per class).
    "cifar10-cond-ect": TrainConfig(name="cifar10-cond-ect", net=_CIFAR_COND_NET, loss=_CIFAR_LOSS,
                                    **{**_CIFAR, "cond": True, "init": "edm-cifar10-32x32-cond-vp.pkl"}),
    "cifar10-cond-sct": TrainConfig(name="cifar10-cond-sct", net=_CIFAR_COND_NET, loss=_CIFAR_SCT_LOSS,
                                    **{**_CIFAR, "cond": True, "init": "edm-cifar10-32x32-cond-vp.pkl"}),
    **{f"imagenet64-{s}-{task}": _img64(s, task) for s in _IMG64_SIZES for task in ("ect", "sct")},
}
# Precision of the paper-scale presets (issue 8). Rule: bf16 while its rounding error is smaller than the signal
# the consistency loss trains on, TF32 from the first stage a where the worst-t relative error of
# D(x_t, t) - D(x_r, r) in bf16 against float64 exceeds 1 (sctlib.precision.switch_stage; tests/test_precision.py
# recomputes A from the committed records). benchmarks/precision.py on one H200, trained weights:
# - DDPM++ 55.7M (benchmarks/results/precision_h200_cifar10.json): bf16 error 0.49 at a = 3, 1.18 at a = 4 -> A = 4.
#   The whole ECT gradient's cosine against float64 agrees: >= 0.986 in bf16 up to a = 3, then 0.964 / 0.891 /
#   0.84 / 0.77 / 0.63 / 0.45 at a = 4 .. 9; TF32 >= 0.988 throughout; fp16 + scaler 0.998 at a = 5, 0.82 at a = 9.
# - EDM2-S (benchmarks/results/precision_h200_edm2s.json; q = 4, Delta t / t = 4^-a n(t)): bf16 error 0.87 at
#   a = 3, 3.15 at a = 4 -> A = 4. Its whole-gradient cosine stays >= 0.99996 in every format up to a = 5, but
#   that teacher had seen only 30,000 images, so the difference measure, on which both networks agree, decides.
#   (Until 2026-11-29 ImageNet-64 switched at a = 2, the DDPM++ Delta t carried over; the EDM2-S error puts it
#   at 4, which trains the ECT schedule 75% in bf16 instead of 25%: 249 vs 195 img/s eager, schedule_mix.)
# Matched tuning runs (SCT, natural-image set at 32x32, one H200, 3 seeds per format, same teacher, images and
# seeds, to a = 8: experiments/results/natural32prec_2026-11-29_a8/, book/results/natural32prec_precision.json):
# FID-5k at 1 step 230.4-231.6 for bf16, fp16 + scaler, TF32 and this rule (sd 0.4-1.9): the switch costs no FID.
# At 2 steps TF32 and the rule were ahead of bf16 throughout in each of the 3 seeds (paired differences -0.4 to
# -2.2, means -1.1 and -1.3): consistent with the switch, not proof (3 same-signed differences happen by chance
# 1 time in 4; at 12,000 images TF32 was behind in every seed by 0.05-0.16). fp16 skipped 9 of 188 steps per
# run and is not a default. Cost of the CIFAR-10 rule over its
# schedule, eager, idle H200: 650 img/s against 694 in bf16 throughout (-6%;
# benchmarks/results/h200_throughput_cifar10_refs_bf16_tf32.json). On a CPU 'auto' is fp32 throughout.
PRECISION_SWITCH_STAGE = {"cifar10": 4.0, "imagenet64": 4.0}
for _name in [n for n in PRESETS if n.startswith(("cifar10-", "imagenet64-"))]:
    PRESETS[_name] = replace(PRESETS[_name],
                             precision=f"auto,tf32@stage>={PRECISION_SWITCH_STAGE[_name.split('-')[0]]:g}")
# Speed (issue 12): the paper presets compile the network (torch.compile, applied on CUDA only) and keep activations
# and weights channels-last. Measured on one H200, batch 128, bf16 ECT step (book/results/throughput.json): DDPM++
# 1,194 img/s against 753 eager NCHW in the same run (benchmarks/results/h200_cifar10.json), EDM2-S 480 against
# 288 (h200_imagenet64_s_ect_and_partial_sct.jsonl, h200_imagenet64_s_compile_f64_logits.json); through the CLI
# (cifar10-sct) 750 against 475 img/s (h200_cli_compile_vs_eager.json). Compiled + channels-last changes no number
# beyond the format's own rounding (benchmarks/compile_check.py against eager NCHW bf16, dropout 0, two SCT steps:
# largest loss difference, first gradient, update after both; benchmarks/results/h200_compile_check.json): DDPM++
# loss 4.6e-8, gradient 1.2e-3, update 1.0e-3 relative, all below eager TF32's 8.8e-8 / 3.4e-3 / 3.2e-3; EDM2-S loss 7.4e-8 and update 1.17e-3
# against TF32's 7.7e-8 and 1.14e-3, its raw first gradient 1.7e-2 against 2.5e-3 (from EDM2's initialisation, whose
# output gain is 0, that first gradient is the output gain's alone: one number, cosine 1 by construction); from weights
# after 4 eager steps, at stage 3, EDM2-S's whole gradient moves 5.0e-4 and its update 1.6e-2, below TF32's 6.2e-4 and
# 2.4e-2 (h200_compile_check_warm.json). With dropout on, compiled code draws
# its own masks (same distribution; a run resumes exactly only with the same compile setting).
for _name in [n for n in PRESETS if n.startswith(("cifar10-", "imagenet64-"))]:
    PRESETS[_name] = replace(PRESETS[_name], compile=True, channels_last=True)
# Data path (issue 12): the CIFAR-10 presets hold the set on the GPU (data_on_device; 150 MiB of uint8) and gather each
# batch there. Through the CLI on one H200 (cifar10-sct, 10 ticks of 40 steps = about the first pass over the set, warm
# compile cache, one run each, back to back while the host's other GPU ran a compile check on other cores;
# benchmarks/results/h200x2_cli_data_path.json): 1,047.6 img/s, ticks 937-1,131, against 799.1 (ticks 713-907) with the
# DataLoader in the training process (workers=0), which decodes (first pass), collates and pins each batch between
# two steps that wait on each other (one host sync per step: the skip decision). An earlier session's DataLoader run
# (4 ticks of 20 steps, h200x2_cli_ddp.json) gave 870.8. Later passes read a per-process cache: the gain there is not
# measured. Same batches (bit-equal weights on the CPU, tests/test_train.py).
# ImageNet-64 stays on the DataLoader: its set is 15.7 GB per process, and its SCT presets already hold one copy on
# the GPU as references.
for _name in [n for n in PRESETS if n.startswith("cifar10-")]:
    PRESETS[_name] = replace(PRESETS[_name], data_on_device=True)
# Gradient sync (issue 12): the CIFAR-10 presets combine the gradients of several processes with one all-reduce after
# the backward pass (grad_sync='allreduce'), so each process runs the compiled graph of one process, which DDP would
# split at its buckets. Two H200s (NVLink), cifar10-sct through the CLI with data_on_device, 128 images per GPU,
# warm compile cache, two pairs of 2-process runs in the same call (benchmarks/results/h200x2_cli_grad_sync.json):
# 2,056.1 against DDP's 1,900.6 img/s and 1,953.0 against 1,750.7 (medians of the ticks; +8%, +12%; tick spreads
# 11-24%). Numbers as DDP's: one process's on the CPU (tests/test_train.py); on NCCL both ended the same 3.2271e-4
# from one process (ddp_equivalence.py, compiled digits-sct, an indirect comparison). ImageNet-64 keeps DDP: not
# measured there, and EDM2-S's 1,068 MiB gradient costs 3.4 ms to all-reduce without overlap.
for _name in [n for n in PRESETS if n.startswith("cifar10-")]:
    PRESETS[_name] = replace(PRESETS[_name], grad_sync="allreduce")
for _name in [n for n in PRESETS if n.startswith("imagenet64-") and n.endswith("-sct")]:
    # ImageNet-64 SCT: references from the sample's own class in the whole training set (~1,281 images
    # per class, 15.7 GB of uint8 per GPU). The previous 'all' (global batch of 128 over 1,000 classes)
    # left ~88% of the samples with no other same-class reference: ESS 1.000 measured on 20 batches.
    # ESS on 1,443 64x64x3 natural-image crops (benchmarks/natural_ess.py --size 64), mean (median) over
    # 64 queries: 1,300 references (a class): 2.90 (1.00) at t = 0.5, 3.22 (1.00) at 1, 2.93 (1.00) at 2,
    # 11.7 (1.47) at 5, 39 (14) at 10; 128 references: 1.23, 1.27, 1.33, 2.96, 6.45. At 12,288 dimensions
    # a class-sized set averages mostly above t ~ 2, and only for a minority of samples below it.
    PRESETS[_name] = replace(PRESETS[_name], loss=replace(PRESETS[_name].loss, schedule="smooth",
                                                          ref_source="dataset", ref_conditional=True))


# torch.compile's modes (torch.compile docstring); 'reduce-overhead' adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def get_preset(name: str) -> TrainConfig:
    """Return the named preset, or raise a :class:`ConfigError` listing the valid names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# ------------------------------------------------------------------------------------------------
# Overrides, (de)serialisation.

def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(value: Any, tp, where: str):
    """Convert a CLI string (or a JSON value) to the field's type; raise ConfigError if impossible."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, args[0], where)
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if isinstance(value, str):
            s = value.strip().strip("()[]")
            items = [v for v in s.split(",") if v.strip() != ""]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{where}: expected a comma-separated list, got {value!r}")
        elem = args[0] if args else str
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, elem, where) for v in items)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, str):
                f = float(value.replace("_", ""))
                if f != int(f):
                    raise ValueError(value)
                return int(f)
            if isinstance(value, float) and value != int(value):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError, OverflowError):  # OverflowError: int('inf')
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def override(cfg, **changes):
    """``dataclasses.replace`` with validation: dotted keys reach nested configs (``loss.q=4``)."""
    nested: dict = {}
    flat: dict = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        types = _field_types(type(cfg))
        if head not in types:
            raise ConfigError(
                f"unknown key {key!r} for {type(cfg).__name__}; valid keys: {', '.join(sorted(types))}")
        if rest:
            if not is_dataclass(types[head]):
                raise ConfigError(f"{head!r} is not a nested config; {key!r} is invalid")
            nested.setdefault(head, {})[rest] = value
        else:
            if is_dataclass(types[head]):
                raise ConfigError(f"{key!r} is a nested config; set its fields as {key}.<field>=...")
            flat[head] = _coerce(value, types[head], f"{type(cfg).__name__}.{key}")
    for head, sub in nested.items():
        flat[head] = override(getattr(cfg, head), **sub)
    return replace(cfg, **flat)


def parse_overrides(items) -> dict:
    """Turn ``['a=1', 'loss.q=4']`` into a dict; raise ConfigError on an item without '='."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def to_dict(cfg) -> dict:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls, d: dict):
    """Inverse of :func:`to_dict`, validating keys and types."""
    types = _field_types(cls)
    unknown = set(d) - set(types)
    if unknown:
        raise ConfigError(f"unknown keys for {cls.__name__}: {sorted(unknown)}; valid keys: {sorted(types)}")
    kwargs = {}
    for k, v in d.items():
        tp = types[k]
        kwargs[k] = from_dict(tp, v) if is_dataclass(tp) else _coerce(v, tp, f"{cls.__name__}.{k}")
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# Value validation (names and types are checked by override/from_dict; these are the ranges).

_DATASETS = ("digits", "digits-pad", "edmzip", "cifar10", "imagenet64")  # plus 'toy2d-<mixture>'


def _check(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _finite_floats(cfg, prefix: str = "") -> None:
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(v):
            _finite_floats(v, key + ".")
        for x in (v if isinstance(v, tuple) else (v,)):
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{key}={v!r}: must be a finite number")


def validate(cfg: "TrainConfig") -> "TrainConfig":
    """Check the values of a training config; raise :class:`ConfigError` naming the key. Returns ``cfg``.

    Only ranges and closed choices are checked here (names and types are checked on override); settings
    whose choices belong to other modules (``precision``, loss schedules, reference sources) are checked
    where they are used.
    """
    _finite_floats(cfg)
    n, lo, o, e = cfg.net, cfg.loss, cfg.optim, cfg.eval
    _check(cfg.dataset in _DATASETS or (cfg.dataset.startswith("toy2d-") and len(cfg.dataset) > 6), "dataset",
           cfg.dataset, f"unknown data set; valid: {', '.join(_DATASETS)}, toy2d-<mixture>")
    _check(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "must be 'auto', 'cpu' or 'cuda'")
    _check(0 <= cfg.seed < 2**63, "seed", cfg.seed, "must be in [0, 2^63)")
    _check(cfg.total_nimg > 0, "total_nimg", cfg.total_nimg, "must be > 0")
    _check(cfg.batch_size > 0, "batch_size", cfg.batch_size, "must be > 0")
    _check(cfg.batch_gpu >= 0, "batch_gpu", cfg.batch_gpu, "must be >= 0 (0 = batch_size / processes)")
    for key in ("tick_nimg", "checkpoint_nimg", "sample_nimg", "ema_halflife_nimg", "workers", "data_resolution"):
        _check(getattr(cfg, key) >= 0, key, getattr(cfg, key), "must be >= 0")
    _check(cfg.keep_checkpoints >= 1, "keep_checkpoints", cfg.keep_checkpoints,
           "must be >= 1 (the newest checkpoint is what a resume needs)")
    _check(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", cfg.max_nonfinite_steps, "must be >= 1")
    _check(cfg.ema_rampup_ratio >= 0, "ema_rampup_ratio", cfg.ema_rampup_ratio, "must be >= 0")
    _check(all(0 < s < 1 for s in cfg.phema_stds), "phema_stds", cfg.phema_stds, "each sigma_rel must be in (0, 1)")
    # network
    _check(n.arch in ("ddpmpp", "edm2", "mlp"), "net.arch", n.arch, "must be 'ddpmpp', 'edm2' or 'mlp'")
    for key in ("img_resolution", "img_channels", "model_channels"):
        _check(getattr(n, key) > 0, f"net.{key}", getattr(n, key), "must be > 0")
    for key in ("label_dim", "num_blocks", "dropout_res"):
        _check(getattr(n, key) >= 0, f"net.{key}", getattr(n, key), "must be >= 0")
    _check(all(m > 0 for m in n.channel_mult), "net.channel_mult", n.channel_mult, "multipliers must be > 0")
    _check(0 <= n.dropout < 1, "net.dropout", n.dropout, "a probability in [0, 1)")
    _check(n.sigma_data > 0, "net.sigma_data", n.sigma_data, "must be > 0")
    _check(n.sigma_min > 0, "net.sigma_min", n.sigma_min, "must be > 0")
    _check(n.boundary in ("never", "eval", "always"), "net.boundary", n.boundary, "must be 'never', 'eval' or 'always'")
    # loss
    _check(lo.task in ("edm", "ect", "sct"), "loss.task", lo.task, "must be 'edm', 'ect' or 'sct'")
    _check(lo.P_std > 0, "loss.P_std", lo.P_std, "must be > 0")
    _check(lo.ref_size >= 0, "loss.ref_size", lo.ref_size, "must be >= 0")
    _check(lo.ref_chunk > 0, "loss.ref_chunk", lo.ref_chunk, "must be > 0")
    _check(lo.ref_compute in ("mixed", "float64"), "loss.ref_compute", lo.ref_compute, "must be 'mixed' or 'float64'")
    _check(lo.c >= 0, "loss.c", lo.c, "must be >= 0")
    # optimizer
    _check(o.name in ("adam", "radam"), "optim.name", o.name, "must be 'adam' or 'radam'")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "two values in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    _check(o.lr_schedule in ("constant", "inv_sqrt"), "optim.lr_schedule", o.lr_schedule, "'constant' or 'inv_sqrt'")
    _check(o.lr_ref_nimg > 0, "optim.lr_ref_nimg", o.lr_ref_nimg, "must be > 0")
    _check(o.lr_rampup_nimg >= 0, "optim.lr_rampup_nimg", o.lr_rampup_nimg, "must be >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    _check(o.impl in ("foreach", "fused"), "optim.impl", o.impl, "must be 'foreach' or 'fused'")
    _check(o.impl != "fused" or o.name == "adam", "optim.impl", o.impl,
           "'fused' needs optim.name='adam' (PyTorch has no fused RAdam)")
    _check(cfg.ddp_bucket_mb >= 0, "ddp_bucket_mb", cfg.ddp_bucket_mb, "must be >= 0 (MiB; 0 = PyTorch's default)")
    _check(cfg.grad_sync in ("ddp", "allreduce"), "grad_sync", cfg.grad_sync, "'ddp' or 'allreduce'")
    _check(cfg.compile_mode in COMPILE_MODES, "compile_mode", cfg.compile_mode, f"one of {', '.join(COMPILE_MODES)}")
    # evaluation
    _check(e.t_max > 0, "eval.t_max", e.t_max, "must be > 0")
    _check(all(0 < t < e.t_max for t in e.mid_t), "eval.mid_t", e.mid_t, "each must be in (0, eval.t_max)")
    _check(e.num_samples > 0, "eval.num_samples", e.num_samples, "must be > 0")
    _check(e.every_nimg >= 0, "eval.every_nimg", e.every_nimg, "must be >= 0")
    return cfg
