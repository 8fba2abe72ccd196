"""Model FLOPs of the training step and model-FLOP utilisation (MFU), for the throughput benchmark (issue 12).

MFU = (images per second x model FLOPs per image) / the GPU's dense peak. The model FLOPs are those of the
network calls one training step makes, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix
multiplies, convolutions and attention, forward and backward, 2 FLOPs per multiply-add) while a real
``Trainer.train_step`` of the config runs on the CPU. ECT's and SCT's steps call the network alike: the
student at (x_t, t) with gradients, the target at (x_r, r) without (ECT Eq. 8; SCT replaces the point x_r,
not the call), so the count of the ECT step is the model work of both; SCT's reference arithmetic is
overhead, not model work, and is left out on purpose (``task='ect'`` below).

The peak is the dense (no sparsity) bf16 tensor-core rate from the vendor's data sheet; a row trained in
TF32 or fp32 is still divided by the bf16 peak, so that rows of one GPU compare on one scale.
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from typing import Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["PEAK_BF16_DENSE_TFLOPS", "peak_tflops", "step_flops_per_image", "mfu"]

# Dense bf16 tensor-core peaks, TFLOP/s (NVIDIA data sheets; no 2:4 sparsity). The plain names are the SXM
# parts; the PCIe / NVL parts are slower and matched first (longest key wins).
PEAK_BF16_DENSE_TFLOPS = {"H200": 989.4, "H200 NVL": 835.0, "H100": 989.4, "H100 PCIe": 756.0,
                          "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "RTX 4090": 165.2}


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU named as ``torch.cuda.get_device_name()`` names it, or None if unknown.
    Longer keys first, so that 'H100' does not match an 'H1000'."""
    for key in sorted(PEAK_BF16_DENSE_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_DENSE_TFLOPS[key]
    return None


def step_flops_per_image(cfg, *, batch: int = 2, device: str = "cpu", as_ect: bool = True) -> float:
    """Model FLOPs per image of one training step of ``cfg`` (a TrainConfig), counted in fp32 on ``device``
    (the count does not depend on it; a GPU only counts faster).

    The config is run as ECT (``loss.task='ect'``: the same network calls as SCT, without SCT's reference
    arithmetic) with ``batch`` images; the count is divided by ``batch`` (it is exactly linear in the batch:
    every counted op is per sample). EMA and optimizer updates are elementwise and not counted.
    ``as_ect=False`` counts the config's own task (SCT: the network calls plus its reference arithmetic).
    Attention is counted on PyTorch's math backend, which has a FLOP formula whatever the memory layout
    (the CPU's fused kernel has none and would count 0).
    """
    from .data import SyntheticImages
    from .train import Trainer

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    loss = replace(cfg.loss, task="ect") if (as_ect and cfg.loss.task == "sct") else cfg.loss
    run = replace(cfg, device=device, precision="fp32", compile=False, channels_last=False, batch_size=batch,
                  batch_gpu=0, init="", loss=loss, tick_nimg=10**12, checkpoint_nimg=0, sample_nimg=0,
                  eval=replace(cfg.eval, every_nimg=0))
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(run, tmp, progress=False, dataset=SyntheticImages.for_config(run, 2 * batch))
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            tr.train_step()
        total = counter.get_total_flops()
        del tr
    return float(total) / batch


def mfu(img_per_s: float, flops_per_image: float, device_name: str) -> Optional[float]:
    """Model-FLOP utilisation: achieved model FLOP/s over the GPU's dense bf16 peak (None for an unknown GPU)."""
    peak = peak_tflops(device_name)
    if peak is None:
        return None
    return float(img_per_s) * float(flops_per_image) / (peak * 1e12)


def main(argv=None) -> int:
    """``python -m sctlib.flops --presets cifar10-ect,imagenet64-s-ect --out step_flops.json``: the model FLOPs
    per image of each preset's training step, as JSON (``{'rows': [{'preset', 'net', 'gflop_per_img'}]}``).
    A bad preset name or an unwritable --out is one ``error: ...`` line (exit 2), before any counting."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from .config import get_preset
    from .errors import UserError, cli_main

    ap = argparse.ArgumentParser(prog="python -m sctlib.flops", description=main.__doc__.split(":")[0])
    ap.add_argument("--presets", default="cifar10-ect,imagenet64-s-ect")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    def run():
        cfgs = [(name, get_preset(name)) for name in args.presets.split(",")]  # every name checked first
        if args.out and not Path(args.out).resolve().parent.is_dir():
            raise UserError(f"--out {args.out}: the folder {Path(args.out).resolve().parent} does not exist")
        rows = []
        for name, cfg in cfgs:
            g = step_flops_per_image(cfg, batch=args.batch) / 1e9
            rows.append({"preset": name, "net": name.rsplit("-", 1)[0], "arch": cfg.net.arch, "gflop_per_img": g})
            print(f"{name:22s} {g:10.2f} GFLOP per image per training step", flush=True)
        if args.out:
            rec = {"command": "python -m sctlib.flops " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "torch": torch.__version__,
                   "note": "Model FLOPs of one training step per image (student forward and backward, target "
                           "forward; matmul / conv / attention, 2 per multiply-add), counted by "
                           "torch.utils.flop_counter while an fp32 ECT step of the preset runs on the CPU.",
                   "rows": rows}
            Path(args.out).write_text(json.dumps(rec, indent=1))
        return 0

    return cli_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
