"""What bf16, fp16, TF32 and fp32 do to the consistency signal of a TRAINED network, stage by stage.

The ECT / SCT loss trains on D(x_t, t) - D(x_r, r) with Delta t / t = q^-a n(t) (ECT Sec. 3,
n(t) = 1 + k sigmoid(-b t)); the difference shrinks by q per stage while the rounding of each D does not.
For every stage exponent a that the presets reach (1 .. 1 + total_nimg / double_nimg, the end of SCT's
smooth schedule), on a fixed set of x0, eps and t values, this measures

(a) the relative error ||Delta_fmt - Delta_ref|| / ||Delta_ref|| of Delta = D(x_t, t) - D(x_r, r) with
    x_r = x0 + r eps (ECT's target point), per t value ("t-bin"), and
(b) the cosine similarity (and relative error) of the whole parameter gradient of one fixed batch of the
    real ECT and SCT losses (sctlib.losses, same t, eps, references) against the reference,

for fmt in fp32 (TF32 off), tf32, bf16 autocast and fp16 autocast (gradient scaled as a GradScaler would:
start at 2^16, halve until the gradient is finite). The reference runs the same network in float64
(weights, activations, preconditioning and EDM2's Fourier features; inputs are the same float32 x_t, t, r),
or in fp32 without TF32 with ``--reference fp32``.

Weights must be trained: ``--teacher`` loads a run dir or an sctlib .safetensors (+ .json); otherwise a
teacher is pre-trained here by denoising score matching (EDM loss) on the embedded digits for
``--teacher-nimg`` images (resized, grey repeated to 3 channels, for the CIFAR-10 / ImageNet-64 shapes).
The JSON says which. Dropout is switched off during the measurement (it would draw different masks).

    # CPU, digits preset network (the committed CPU result)
    python benchmarks/precision.py --nets digits --teacher-nimg 256000 --out benchmarks/results/precision_cpu_digits.json
    # GPU: DDPM++ (CIFAR-10 size, 55.7M) and EDM2-S (ImageNet-64 size, 280M); teacher lengths per net (not yet
    # timed on a GPU: choose them for the minutes available); the measurement itself is sized for a few minutes
    python benchmarks/precision.py --nets cifar10,imagenet64-s --teacher-nimg 150000,40000 \\
        --out benchmarks/results/precision_h200.json
    # the GPU code path on the CPU with tiny widths
    python benchmarks/precision.py --nets cifar10,imagenet64-s --tiny --teacher-nimg 2048 --out /tmp/p.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sctlib import checkpoints, config as C, train as T  # noqa: E402
from sctlib.data.embedded import digits_images  # noqa: E402
from sctlib.losses import build_loss  # noqa: E402
from sctlib.networks import build_network, count_params  # noqa: E402
from sctlib.networks.edm2 import MPFourier  # noqa: E402
from sctlib.precision import autocast, set_tf32  # noqa: E402
from sctlib.precond import as_sigma, boundary_scalings, edm_scalings  # noqa: E402
from sctlib.schedules import mapping_r  # noqa: E402

FORMATS = ("fp32", "tf32", "bf16", "fp16")
# name -> (ECT preset, SCT preset, image channels of the measurement data, resolution)
NETS = {
    "digits": ("digits-ect", "digits-sct"),
    "cifar10": ("cifar10-ect", "cifar10-sct"),
    "imagenet64-s": ("imagenet64-s-ect", "imagenet64-s-sct"),
}
T_VALUES = (0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 40.0)


# ------------------------------------------------------------------------------------------------
# Data and teacher.

class Images(torch.utils.data.Dataset):
    """Embedded digits shaped like the network's data: [N, C, R, R] in [-1, 1], labels 0..9."""

    def __init__(self, channels: int, resolution: int, label_dim: int):
        base = min(resolution, 32)
        X, y = digits_images(base)
        if resolution != base:  # 64: bilinear up-sampling of the 32x32 digits
            X = F.interpolate(X, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.X = X.repeat(1, channels, 1, 1).contiguous()
        self.y = y
        self.label_dim = label_dim
        self.shape = tuple(self.X.shape[1:])

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]

    def tensors(self):
        return self.X, self.y


def preset_for(name: str, tiny: bool):
    ect = C.get_preset(NETS[name][0])
    net = ect.net
    if tiny and name != "digits":
        net = replace(net, model_channels=16, num_blocks=1, img_resolution=16,
                      channel_mult=net.channel_mult[:2], attn_resolutions=(8,))
    return ect, C.get_preset(NETS[name][1]), net


def train_teacher(name: str, net_cfg, data: Images, nimg: int, run_dir: Path, device: str) -> Path:
    """Denoising score matching (EDM Eq. 2) from scratch on the embedded digits; returns the run dir."""
    base = C.get_preset("digits-edm") if name == "digits" else C.get_preset(NETS[name][0])
    optim = base.optim if name == "digits" else (
        # DDPM++: Adam 2e-4 with a warm-up (1e-3 diverged on a 128 batch); EDM2-S: its preset's Adam 1e-3, inv-sqrt
        replace(base.optim, name="adam", lr=2e-4 if net_cfg.arch == "ddpmpp" else base.optim.lr,
                betas=(0.9, 0.99), lr_rampup_nimg=min(nimg // 10, 200_000)))
    batch = 128 if name == "digits" or device == "cpu" else 256
    cfg = replace(base, name=f"{name}-teacher", net=replace(net_cfg, boundary="never"), cond=net_cfg.label_dim > 0,
                  loss=C.LossConfig(task="edm", P_mean=-1.2, P_std=1.2, weighting="edm"), optim=optim,
                  init="", total_nimg=nimg, batch_size=min(batch, max(8, nimg // 8)), batch_gpu=0, device=device,
                  precision="auto", ema_halflife_nimg=max(nimg // 8, 1000), ema_rampup_ratio=0.0, phema_stds=(),
                  tick_nimg=max(nimg // 8, 1), checkpoint_nimg=0, sample_nimg=0, eval=replace(base.eval, every_nimg=0))
    summary = T.train(cfg, run_dir, progress=False, dataset=data)
    last = summary.get("last_tick") or {}
    if last.get("nonfinite_losses", 0) or not math.isfinite(last.get("loss", float("nan"))):
        raise RuntimeError(f"the {name} teacher diverged (last tick {last.get('loss')}, "
                           f"{last.get('nonfinite_losses')} non-finite losses); see {run_dir}/stats.jsonl")
    return run_dir


def load_teacher(path: str):
    p = Path(path)
    if p.is_dir():
        return T.load_run(p)
    return checkpoints.load_model(str(p.with_suffix("")) if p.suffix == ".safetensors" else str(p))


# ------------------------------------------------------------------------------------------------
# The float64 reference denoiser.

def _fourier_f64(self, x):
    y = torch.outer(x.to(torch.float64).reshape(-1), self.freqs.to(torch.float64))
    return (y + self.phases.to(torch.float64)).cos() * math.sqrt(2)


class Float64Denoiser(torch.nn.Module):
    """EDM's D(x, sigma) with every computation in float64 (Precond casts to float32 by design).

    The attribute is not called ``module`` on purpose: the losses take ``net.module`` as the target net."""

    def __init__(self, pre):
        super().__init__()
        self.pre = pre.double()
        for m in self.pre.modules():
            if isinstance(m, MPFourier):  # EDM2 keeps its Fourier features in fp32 in every format
                m.forward = types.MethodType(_fourier_f64, m)

    def forward(self, x, sigma, labels=None):
        pre = self.pre
        x = x.to(torch.float64)
        s = as_sigma(sigma, x).to(torch.float64)  # the same float32 sigma values as every format
        c_skip, c_out, c_in, c_noise = edm_scalings(s, pre.sigma_data)
        if pre.use_boundary():
            c_skip, c_out = boundary_scalings(s, pre.sigma_data, pre.sigma_min)
        lab = None
        if pre.label_dim:
            lab = F.one_hot(torch.as_tensor(labels, device=x.device).long(), pre.label_dim).to(torch.float64)
        out = pre.inner(c_in * x, c_noise.reshape(-1), lab)
        return c_skip * x + c_out * out.to(torch.float64)


class Float32Reference(torch.nn.Module):
    """The fallback reference: the same weights in float32 (run with TF32 off), where float64 does not fit."""

    def __init__(self, pre):
        super().__init__()
        self.pre = pre

    def forward(self, x, sigma, labels=None):
        return self.pre(x, sigma, labels)


def _run_format(fmt: str, device: str):
    """Context: TF32 flags and autocast of a format (reference formats 'fp64' / 'fp32ref' are plain)."""
    if fmt in FORMATS:
        set_tf32(fmt, True)
        return autocast(fmt, device)
    set_tf32("fp32")
    return autocast("fp32", device)


# ------------------------------------------------------------------------------------------------
# (a) the difference D(x_t, t) - D(x_r, r).

@torch.no_grad()
def measure_diff(net32, ref, data, stages, q, k, b, n_per_t, device, seed, batch):
    """Relative error of Delta = D(x_t,t) - D(x_r,r) per format, stage and t value."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_t * len(T_VALUES)
    idx = torch.randint(len(data), (n,), generator=g)
    x0 = data.X[idx].to(device)
    labels = (data.y[idx] % max(net32.label_dim, 1)).to(device) if net32.label_dim else None
    eps = torch.randn(x0.shape, generator=g).to(device)
    t = torch.tensor(T_VALUES, dtype=torch.float32).repeat_interleave(n_per_t).to(device)
    sig = lambda v: v.reshape(-1, *([1] * (x0.ndim - 1)))  # noqa: E731
    x_t = x0 + sig(t) * eps

    def D(model, fmt, x, s):
        outs = []
        for j in range(0, n, batch):
            lab = labels[j:j + batch] if labels is not None else None
            with _run_format(fmt, device):
                outs.append(model(x[j:j + batch], s[j:j + batch], lab).to(torch.float64))
        return torch.cat(outs)

    models = {"ref": (ref, "ref"), **{f: (net32, f) for f in FORMATS}}
    D_t = {name: D(m, f, x_t, t) for name, (m, f) in models.items()}
    out = {f: [] for f in FORMATS}
    med = {f: [] for f in FORMATS}
    size = []
    for a in stages:
        r = mapping_r(t, float(a), q=q, k=k, b=b, mapping="sigmoid")
        # Where r = 0 the target is the clean x0 (no second network call): Delta is not a network
        # difference there. Such t values get r = t (Delta = 0 in every format) and are reported as null.
        r = torch.where(r > 0, r, t)
        x_r = x0 + sig(r) * eps
        delta = {name: D_t[name] - D(m, f, x_r, r) for name, (m, f) in models.items()}
        d_ref = delta["ref"].reshape(len(T_VALUES), n_per_t, -1)
        D_ref = D_t["ref"].reshape(len(T_VALUES), n_per_t, -1)
        size.append((d_ref.norm(dim=(1, 2)) / D_ref.norm(dim=(1, 2))).tolist())
        for f in FORMATS:
            e = (delta[f].reshape(len(T_VALUES), n_per_t, -1) - d_ref)
            out[f].append((e.norm(dim=(1, 2)) / d_ref.norm(dim=(1, 2))).tolist())
            per_sample = e.norm(dim=2) / d_ref.norm(dim=2)
            med[f].append(per_sample.median(dim=1).values.tolist())
    return {"rel_error": out, "rel_error_median": med, "diff_rel_size": size}


# ------------------------------------------------------------------------------------------------
# (b) the gradient of one fixed batch of the real loss.

def _flat_grad(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                      for p in model.parameters()])


def loss_grad(model, loss_fn, x0, labels, nimg, fmt, device, seed, sd):
    """Gradient of mean(loss) for one format; fp16 scales as a GradScaler (2^16, halved on overflow)."""
    scale, tries = 2.0**16 if fmt == "fp16" else 1.0, 0
    inner = getattr(model, "pre", model)
    while True:
        inner.load_state_dict(sd)  # identical weights in every format (EDM2 renormalises in place)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same t, eps (and references) in every format
        with _run_format(fmt, device):
            loss, _ = loss_fn(model, x0, labels, nimg=nimg)
        obj = loss.to(torch.float64 if fmt == "ref" else torch.float32).mean()
        (obj * scale).backward()
        gvec = _flat_grad(model) / scale
        if bool(torch.isfinite(gvec).all()) or fmt != "fp16" or tries > 40:
            return gvec, scale, float(obj.detach())
        scale, tries = scale / 2, tries + 1


def measure_grad(net32, ref, loss_cfgs, data, stages, batch, device, seed):
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(len(data), (batch,), generator=g)
    x0 = data.X[idx].to(device)
    labels = (data.y[idx] % max(net32.label_dim, 1)).to(device) if net32.label_dim else None
    sd32 = {k: v.clone() for k, v in net32.state_dict().items()}
    sizes = [p.numel() for p in net32.parameters()]  # _flat_grad fills absent gradients with zeros
    sd64 = {k: v.clone() for k, v in ref.pre.state_dict().items()}
    out = {}
    for task, lcfg in loss_cfgs.items():
        loss_fn = build_loss(lcfg)
        res = {f: {"cosine": [], "rel_error": [], "cosine_tensor_median": [], "cosine_tensor_min": [], "fp16_scale": [],
                   "loss": []} for f in FORMATS}
        res["ref_loss"] = []
        for a in stages:
            nimg = int(round((a - 1) * lcfg.double_nimg))  # stage exponent a (staircase and smooth agree here)
            g_ref, _, l_ref = loss_grad(ref, loss_fn, x0, labels, nimg, "ref", device, seed, sd64)
            res["ref_loss"].append(l_ref)
            for f in FORMATS:
                gv, scale, lv = loss_grad(net32, loss_fn, x0, labels, nimg, f, device, seed, sd32)
                ok = bool(torch.isfinite(gv).all())
                cos = float(gv @ g_ref / (gv.norm() * g_ref.norm())) if ok else float("nan")
                res[f]["cosine"].append(cos)
                res[f]["rel_error"].append(float((gv - g_ref).norm() / g_ref.norm()) if ok else float("nan"))
                # per parameter tensor: the whole-vector cosine is dominated by the largest gradients
                per = [float(x @ y / (x.norm() * y.norm())) for x, y in zip(gv.split(sizes), g_ref.split(sizes))
                       if float(y.norm()) > 0] if ok else [float("nan")]
                res[f]["cosine_tensor_median"].append(float(np.median(per)))
                res[f]["cosine_tensor_min"].append(float(np.min(per)))
                res[f]["fp16_scale"].append(scale if f == "fp16" else None)
                res[f]["loss"].append(lv)
        out[task] = res
    net32.load_state_dict(sd32)
    return out


# ------------------------------------------------------------------------------------------------

def bench_net(name, args, device, work: Path, teacher_path: str = "", teacher_nimg: int = 0):
    t0 = time.time()
    ect, sct, net_cfg = preset_for(name, args.tiny)
    data = Images(net_cfg.img_channels, net_cfg.img_resolution, net_cfg.label_dim)
    teacher = {}
    if teacher_path:
        model, info = load_teacher(teacher_path)
        teacher = {"source": str(teacher_path), "meta": info.get("meta", {})}
        net_cfg = C.from_dict(C.NetConfig, info["net_config"])
        sd = model.state_dict()
    else:
        run = train_teacher(name, net_cfg, data, teacher_nimg, work / f"{name}-teacher", device)
        model, info = T.load_run(run)
        sd = model.state_dict()
        teacher = {"source": "trained by this script: denoising score matching (EDM loss, P_mean -1.2, P_std 1.2) "
                             "from random initialisation on the embedded digits"
                             + ("" if name == "digits" else
                                f" (resized to {net_cfg.img_resolution}x{net_cfg.img_resolution}, grey in "
                                f"{net_cfg.img_channels} channels; a short pre-training, not a converged model)"),
                   "nimg": teacher_nimg, "weights": "EMA"}
    t_teacher = time.time() - t0
    # Measurement network: the preset's boundary mode, dropout off, train mode (as in tuning).
    mcfg = replace(net_cfg, dropout=0.0, boundary=ect.net.boundary)
    net32 = build_network(mcfg).to(device).train()
    net32.load_state_dict(sd)
    loss_data = replace(ect.loss, ref_source="batch")
    # one normalising pass (EDM2's forced weight normalisation) before the weights are snapshot
    with torch.enable_grad():
        x = data.X[:2].to(device)
        lab = data.y[:2].to(device) if mcfg.label_dim else None
        net32(x, torch.ones(2, device=device), lab).sum().backward()
    net32.zero_grad(set_to_none=True)
    if args.reference == "fp64":
        ref = Float64Denoiser(build_network(mcfg).to(device).train())
        ref.pre.load_state_dict(net32.state_dict())
    else:  # fp32 without TF32: the same weights in a second module
        ref = Float32Reference(build_network(mcfg).to(device).train())
        ref.pre.load_state_dict(net32.state_dict())
    a_max = max(1 + cfg.total_nimg / cfg.loss.double_nimg for cfg in (ect, sct))
    stages = [float(a) for a in (args.stages or range(1, int(math.floor(a_max)) + 1))]
    diff = measure_diff(net32, ref, data, stages, ect.loss.q, ect.loss.k, ect.loss.b, args.n_per_t, device,
                        args.seed, args.batch)
    t_diff = time.time() - t0 - t_teacher
    loss_cfgs = {"ect": loss_data, "sct": replace(sct.loss, ref_source="batch")}
    grad = measure_grad(net32, ref, {k: loss_cfgs[k] for k in args.tasks.split(",")}, data, stages, args.grad_batch,
                        device, args.seed)
    t_grad = time.time() - t0 - t_teacher - t_diff
    return {
        "presets": list(NETS[name]), "net_config": C.to_dict(mcfg), "params": count_params(net32),
        "teacher": teacher, "reference": args.reference, "stages": stages,
        "stage_rule": "a = 1 .. 1 + total_nimg / double_nimg (the last value of SCT's smooth schedule)",
        "q": ect.loss.q, "k": ect.loss.k, "t_values": list(T_VALUES), "n_per_t": args.n_per_t,
        "grad_batch": args.grad_batch, "grad_ref_source": "batch",
        "diff": diff, "grad": grad,
        "seconds": {"teacher": t_teacher, "diff": t_diff, "grad": t_grad},
    }


def _json_safe(x):
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nets = list(result["nets"])
    fig = Figure(figsize=(15, 3.6 * len(nets)))
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(nets), 3, squeeze=False))
    colors = {"fp32": "k", "tf32": "tab:blue", "bf16": "tab:red", "fp16": "tab:orange"}
    for row, name in zip(axes, nets):
        r = result["nets"][name]
        st = r["stages"]
        ax = row[0]
        for f in FORMATS:
            e = np.array(r["diff"]["rel_error"][f], dtype=float)  # [stage, t]; NaN where r = 0
            ax.plot(st, np.nanmax(e, axis=1), "-", color=colors[f], label=f"{f} (max over t)")
            ax.plot(st, np.nanmin(e, axis=1), ":", color=colors[f])
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_yscale("log")
        ax.set_xlabel("stage exponent a")
        ax.set_ylabel("rel. error of D(x_t)-D(x_r)")
        ax.set_title(f"{name}: difference error (solid max, dotted min over t)", fontsize=9)
        ax.legend(fontsize=7)
        ax = row[1]
        last = len(st) - 1
        for f in FORMATS:
            ax.plot(r["t_values"], np.array(r["diff"]["rel_error"][f][last], dtype=float), "o-", color=colors[f],
                    label=f)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("t")
        ax.set_title(f"{name}: per t at a = {st[last]:g}", fontsize=9)
        ax = row[2]
        for task, ls in (("ect", "-"), ("sct", "--")):
            if task not in r["grad"]:
                continue
            for f in FORMATS:
                c = np.array(r["grad"][task][f]["cosine"], dtype=float)
                ax.plot(st, np.maximum(1 - c, 1e-12), ls, color=colors[f], label=f"{f} {task}")
        ax.set_yscale("log")
        ax.set_xlabel("stage exponent a")
        ax.set_ylabel("1 - cos(grad, reference grad)")
        ax.set_title(f"{name}: whole-gradient cosine, one batch", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    cpu = " (CPU: tf32 is fp32 there)" if result.get("device") == "cpu" else ""
    fig.suptitle(f"{result.get('device_name') or result.get('device')}{cpu}; reference {r['reference']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", default="digits", help="comma list of: " + ", ".join(NETS))
    p.add_argument("--teacher", default="", help="run dir or .safetensors of a trained model, one per net (comma list)")
    p.add_argument("--teacher-nimg", default="256000",
                   help="images of the teacher pre-training here: one number, or one per net (comma list)")
    p.add_argument("--tiny", action="store_true", help="tiny widths / 16x16 for the big nets (CPU check)")
    p.add_argument("--device", default="auto")
    p.add_argument("--reference", default="fp64", choices=("fp64", "fp32"))
    p.add_argument("--stages", default="", help="comma list of stage exponents (default: all the presets reach)")
    p.add_argument("--tasks", default="ect,sct")
    p.add_argument("--n-per-t", type=int, default=16, help="samples per t value")
    p.add_argument("--batch", type=int, default=64, help="forward batch of (a)")
    p.add_argument("--grad-batch", type=int, default=32, help="the fixed batch of (b)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="", help="folder for teacher runs (default: next to --out)")
    p.add_argument("--out", default="benchmarks/results/precision.json")
    args = p.parse_args(argv)
    args.stages = [float(s) for s in args.stages.split(",")] if args.stages else None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    nets = args.nets.split(",")
    teachers = args.teacher.split(",") if args.teacher else [""] * len(nets)
    teacher_nimgs = [int(float(v)) for v in args.teacher_nimg.split(",")]
    if len(teacher_nimgs) == 1:
        teacher_nimgs = teacher_nimgs * len(nets)
    if len(teachers) != len(nets) or len(teacher_nimgs) != len(nets):
        p.error(f"--teacher / --teacher-nimg need one value per net ({len(nets)}: {args.nets})")
    for n in nets:
        if n not in NETS:
            p.error(f"unknown net {n!r}; valid: {', '.join(NETS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out.parent / (out.stem + "_runs")
    t0 = time.time()
    result = {
        "command": "python benchmarks/precision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "git_sha": T._git_sha(), "formats": list(FORMATS),
        "format_notes": {"fp32": "float32, TF32 off", "tf32": "float32 tensors, TF32 matmuls/convs",
                         "bf16": "bf16 autocast (TF32 on for the rest)", "fp16": "fp16 autocast, loss scaled "
                         "from 2^16 and halved until the gradient is finite (a GradScaler's search)"}
        | ({"cpu": "there is no TF32 on the CPU: tf32 rows equal fp32 rows"} if device == "cpu" else {}),
        "nets": {},
    }
    for name, tpath, tnimg in zip(nets, teachers, teacher_nimgs):
        print(f"[precision] {name} ...", file=sys.stderr, flush=True)
        result["nets"][name] = bench_net(name, args, device, work, tpath, tnimg)
        print(f"[precision] {name} done: {result['nets'][name]['seconds']}", file=sys.stderr, flush=True)
        out.write_text(json.dumps(_json_safe(result), indent=1))  # after each net: a time-boxed run keeps what it made
    result["total_seconds"] = time.time() - t0
    out.write_text(json.dumps(_json_safe(result), indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"out": str(out), "plot": str(out.with_suffix(".png")), "seconds": result["total_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
