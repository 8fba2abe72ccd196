"""Does `torch.compile` + channels-last change the numbers it speeds up? (issue 12: a speed-up ships only with
a check that the loss and gradients stay where they were.)

For each network (DDPM++ at CIFAR-10 shape, EDM2-S at ImageNet-64 shape) and each task (ECT, SCT), Trainers start
from the same weights and seed and take the same `train_step`s on the same synthetic batch (so the same t, r,
noise and references: seeds derive from (seed, rank, images seen)), one per variant:

* ``eager``       - the reference (bf16 autocast, the presets' first format; no compile, NCHW),
* ``eager-again`` - the same again: the noise floor of the GPU itself (cuDNN / atomics are not bit-exact),
* ``compiled``    - `compile=true channels_last=true` (the paper presets' default on CUDA),
* ``eager-tf32``  - the eager step in TF32: the yardstick of what the format's own rounding does;
* opt-in: ``eager-fp32`` (the exact reference: with it every variant is also compared with fp32), ``fused-adam``
  (PyTorch's fused Adam kernel; Adam nets only), ``cudagraphs`` (compiled with ``compile_mode=reduce-overhead``).

It compares with ``eager``: the loss of every step, the whole parameter gradient of the first step (same
weights in every variant: relative difference and cosine), and the weight change after the last step (Adam
turns tiny gradient differences into sign flips of whole updates, so this one is the loosest). The compiled
step is as exact as the format when its differences are no larger than eager-tf32's (printed, not asserted:
fused kernels round bf16 intermediates differently by design).

``--stage A`` starts at nimg = A x double_nimg. At stage 0 ECT's r is 0 and the target is the data point, so only
from stage 1 on does the target pass run the network.

Dropout is off by default (``--dropout 0``): compiled code draws its dropout masks from Inductor's own random
stream (same distribution, other masks). The first H200 run's gradient cosine of 0.974 was not dropout, though:
it was the same with dropout 0. Its cause was `torch.randn_like`, which fills a channels-last batch in memory
order, so the channels-last variant trained on other noise per pixel (fixed: `sctlib.losses.noise_like`).

    python benchmarks/compile_check.py --out compile_check.json      # on a GPU (a few minutes: two compiles)
    python benchmarks/compile_check.py --tiny                        # small networks on the CPU (logic check;
                                                                     # the Trainer compiles on CUDA only)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sctlib import config as C  # noqa: E402
from sctlib.data import SyntheticImages  # noqa: E402
from sctlib.train import Trainer  # noqa: E402

VARIANTS = {"eager": dict(compile=False, channels_last=False), "eager-again": dict(compile=False, channels_last=False),
            "compiled": dict(compile=True, channels_last=True),
            # the yardstick: the same eager step in TF32, i.e. how much the format's own rounding moves the numbers
            "eager-tf32": dict(compile=False, channels_last=False, precision="tf32"),
            # opt-in: the exact reference (fp32, TF32 off); with it every variant is also compared with fp32
            "eager-fp32": dict(compile=False, channels_last=False, precision="fp32"),
            # opt-in: PyTorch's fused Adam kernel instead of the multi-tensor one (Adam nets only; RAdam has none)
            "fused-adam": {"compile": False, "channels_last": False, "optim.impl": "fused"},
            # opt-in: the compiled step replayed as CUDA graphs
            "cudagraphs": {"compile": True, "channels_last": True, "compile_mode": "reduce-overhead"}}
DEFAULT_VARIANTS = ["eager", "eager-again", "compiled", "eager-tf32"]


def _flat(net) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])


@contextlib.contextmanager
def synthetic_trainer(cfg, device: str):
    """A Trainer on an in-memory synthetic set of 4 batches, in a temporary run directory removed afterwards."""
    ds = SyntheticImages.for_config(cfg, 4 * cfg.batch_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        yield Trainer(cfg, tmp, progress=False, dataset=ds)


def warm_state(cfg, steps: int, device: str) -> dict:
    """The network's weights after ``steps`` eager steps from its initialisation (the same for every variant).

    EDM2 initialises its output gain to 0, so at initialisation the first gradient is that one number's alone;
    from warmed weights the first compared gradient is the whole network's."""
    with synthetic_trainer(replace(cfg, compile=False, channels_last=False), device) as tr:
        for _ in range(steps):
            tr.train_step()
        return {k: v.detach().clone() for k, v in tr.net.state_dict().items()}


def run_variant(cfg, steps: int, device: str, start_nimg: int = 0, state: dict | None = None):
    """Losses per step and the total weight change of one Trainer, its first step at ``start_nimg`` images,
    from ``state`` (a state dict) when given, else from the network's initialisation."""
    with synthetic_trainer(cfg, device) as tr:
        if state is not None:
            tr.net.load_state_dict(state)  # copies into the existing (possibly channels-last) parameters
        tr.nimg = start_nimg  # the stage (and the learning rate) of that point of the schedule
        w0 = _flat(tr.net)
        losses, g1 = [], None
        for _ in range(steps):
            before = float(tr.acc["loss_sum"])
            count = float(tr.acc["count"])
            tr.train_step()  # zero_grad comes first in the step, so .grad is this step's gradient afterwards
            losses.append((float(tr.acc["loss_sum"]) - before) / max(float(tr.acc["count"]) - count, 1.0))
            if g1 is None:
                g1 = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1)
                                for p in tr.net.parameters()])
        dw = _flat(tr.net) - w0
    del tr  # before empty_cache: the Trainer holds the network, optimizer state and EMA on the device
    if device == "cuda":
        torch.cuda.empty_cache()
    return losses, g1, dw


def compare(ref, other):
    (l0, g0, dw0), (l1, g1, dw1) = ref, other
    loss_rel = [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(l0, l1)]
    rel = lambda a, b: float((b - a).norm() / a.norm().clamp(min=1e-30))
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
    return {"loss_rel_diff": loss_rel, "loss_rel_diff_max": max(loss_rel), "grad_rel_diff": rel(g0, g1),
            "grad_cosine": cos(g0, g1), "dw_rel_diff": rel(dw0, dw1), "dw_cosine": cos(dw0, dw1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="cifar10,imagenet64-s")
    ap.add_argument("--tasks", default="ect,sct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--stage", type=float, default=0.0,
                    help="start at stage exponent a (nimg = a x double_nimg): from a >= 1 the target pass runs the "
                         "network (at a = 0 ECT's r is 0 and the target is the data point)")
    ap.add_argument("--init-steps", type=int, default=0,
                    help="start every variant from the weights after this many eager steps (EDM2's output gain is 0 "
                         "at initialisation, so the first gradient there is that one number's)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", default="bf16", help="the format of every variant (the presets' first format)")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="net.dropout of every variant (default 0: compiled dropout draws other masks than eager)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="a subset of " + ",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="small networks, batch 8, fp32, on the CPU")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if args.init_steps < 0:
        ap.error(f"--init-steps must be >= 0, got {args.init_steps}")
    if unknown or "eager" not in names:
        ap.error(f"--variants: unknown {unknown}" if unknown else "--variants must include eager")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    rows = []
    for net in args.nets.split(","):
        for task in args.tasks.split(","):
            base = C.get_preset(f"{net}-{task}")
            base = replace(base, device=device, batch_size=args.batch, init="", tick_nimg=10**12,
                           precision=args.precision if device == "cuda" else "fp32",
                           loss=replace(base.loss, double_nimg=3_200_000, ref_source="batch"
                                        if task == "sct" else base.loss.ref_source))
            base = replace(base, net=replace(base.net, dropout=args.dropout))
            if args.tiny:
                base = C.override(base, **{"net.model_channels": 32, "net.num_blocks": 1}, batch_size=8)
            state = None
            if args.init_steps > 0:
                torch.manual_seed(0)
                state = warm_state(base, args.init_steps, device)
            res = {}
            for name, changes in ((n, VARIANTS[n]) for n in names):
                if device == "cpu" and name == "eager-tf32":
                    changes = {**changes, "precision": "fp32"}  # no TF32 on a CPU: the yardstick is the floor there
                if changes.get("optim.impl") == "fused" and base.optim.name != "adam":
                    continue  # no fused RAdam
                torch.manual_seed(0)
                res[name] = run_variant(C.override(base, **changes), args.steps, device,
                                        int(args.stage * base.loss.double_nimg), state)
            if "eager-fp32" in res:  # every variant against the exact reference as well
                row_fp32 = {n: compare(res["eager-fp32"], v) for n, v in res.items() if n != "eager-fp32"}
            row = {"net": net, "task": task, "precision": base.precision, "steps": args.steps, "stage": args.stage,
                   "init_steps": args.init_steps,
                   "batch": base.batch_size, "dropout": args.dropout, "loss_eager": res["eager"][0],
                   **{key: compare(res["eager"], res[name]) for key, name in
                      (("floor", "eager-again"), ("compiled", "compiled"), ("tf32", "eager-tf32"),
                       ("fused_adam", "fused-adam"), ("cudagraphs", "cudagraphs")) if name in res}}
            if "eager-fp32" in res:
                row["vs_fp32"] = row_fp32
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'net':14s} {'task':5s} {'against eager':14s} {'loss rel':>9s} {'grad rel':>9s} {'grad cos':>10s} "
          f"{'dw rel':>9s} {'dw cos':>9s}")
    for r in rows:
        for name in (n for n in ("floor", "tf32", "compiled", "fused_adam", "cudagraphs") if n in r):
            c = r[name]
            label = {"floor": "eager again", "tf32": "eager TF32", "compiled": "compiled + CL",
                     "fused_adam": "fused Adam", "cudagraphs": "CUDA graphs"}[name]
            print(f"{r['net']:14s} {r['task']:5s} {label:14s} {c['loss_rel_diff_max']:9.2e} {c['grad_rel_diff']:9.2e} "
                  f"{c['grad_cosine']:10.6f} {c['dw_rel_diff']:9.2e} {c['dw_cosine']:9.5f}")
    for r in (r for r in rows if "vs_fp32" in r):
        for name, c in r["vs_fp32"].items():
            print(f"{r['net']:14s} {r['task']:5s} {name + ' vs fp32':22s} {c['loss_rel_diff_max']:9.2e} "
                  f"{c['grad_rel_diff']:9.2e} {c['grad_cosine']:10.6f} {c['dw_rel_diff']:9.2e} {c['dw_cosine']:9.5f}")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
