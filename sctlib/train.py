"""The one training loop: diffusion pre-training of a teacher (``edm``), ECT and SCT tuning.

    python -m sctlib.train --preset digits-sct --run-dir runs/digits-sct total_nimg=64000 seed=1
    torchrun --standalone --nproc_per_node=8 -m sctlib.train --preset imagenet64-s-sct --run-dir runs/s-sct \\
        data_path=datasets/edm2-imagenet-64x64.zip init=edm2-img64-s-1073741-0.075.pkl

Design (EDM2's training loop is the model; ECT's weaknesses are listed in ect-edm-code-facts.md Sec. 6):

* Progress is counted in images seen (``nimg``). The data order, the random draws of every micro-batch
  (t, eps, dropout masks) and the schedule are functions of (seed, images seen, position in the global
  batch), so a resumed run continues exactly and 1 process with k accumulation rounds draws what
  k processes draw.
* The gradient is the mean over the *global* batch whatever the split into processes and micro-batches
  (ECT multiplies it by the number of accumulation rounds).
* Non-finite losses or gradients skip the step and are counted; after ``max_nonfinite_steps`` in a row
  the run stops with an error naming the step. Nothing is silently zeroed (ECT uses ``nan_to_num``).
* Checkpoints are inert safetensors files written atomically; the last K are kept; re-running the same
  command resumes from the newest readable one.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import checkpoints, config as config_mod, data as data_mod, rundir, schedules
from .config import ConfigError, TrainConfig
from .errors import UserError, cli_main
from .ema import EMA, PowerFunctionEMA
from .losses import build_loss
from .networks import build_network
from .precision import PrecisionRule, autocast as precision_autocast, set_tf32
from .progress import phase as _phase
from .references import GatheredReferences, StepBatch
from .targets import gather_references

__all__ = [
    "train",
    "Trainer",
    "NonFiniteError",
    "seed_for",
    "IndexStream",
    "load_run",
    "launch",
    "resolve_config",
    "latest_checkpoint",
    "leave_process_group",
    "T_BIN_EDGES",
    "main",
]

# Log-spaced t bins for the per-t target-variance log (ECT vs SCT: the paper's thesis, SCT Fig. 1).
T_BIN_EDGES = tuple(float(x) for x in np.logspace(-3, 2, 11))
# Keys that may change between a run and its resumption: they do not change the trajectory, except that compiled
# code rounds differently and draws its own dropout masks (a run continues bit for bit only with its own setting).
RESUMABLE_KEYS = {"total_nimg", "checkpoint_nimg", "keep_checkpoints", "sample_nimg", "tick_nimg", "workers",
                  "snapshot_fracs",
                  "max_nonfinite_steps", "eval", "device", "compile", "compile_mode", "cudnn_benchmark", "channels_last",
                  "ddp_bucket_mb", "data_preload", "grad_sync", "data_on_device"}
CKPT_RE = re.compile(r"^ckpt-(\d{12})\.safetensors$")


class NonFiniteError(UserError, RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive steps with non-finite loss or gradients."""


def seed_for(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. (seed, images seen + global offset); SeedSequence mixing."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class IndexStream:
    """The global data order: epoch e is a permutation seeded by (seed, e); position p is image p seen.

    Being a pure function of the position, it needs no state in checkpoints: resuming at ``nimg``
    continues the same order (EDM2's ``InfiniteSampler(start_idx=cur_nimg)`` plays the same role).
    """

    def __init__(self, num_items: int, seed: int):
        if num_items <= 0:
            raise ValueError("the dataset is empty")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self._cache: Dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(seed_for(self.seed, 0x5EED, epoch))
            self._cache[epoch] = torch.randperm(self.num_items, generator=g)
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        pos = torch.arange(start, start + count, dtype=torch.int64)
        epochs = pos // self.num_items
        out = torch.empty(count, dtype=torch.int64)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(int(e))[pos[sel] % self.num_items]
        return out


# ------------------------------------------------------------------------------------------------
# The network as the loss calls it: DDP and torch.compile wrappers.

def uses_cudagraphs(cfg: TrainConfig, device_type: str) -> bool:
    """Whether the trainer's compiled network replays CUDA graphs: compiled on CUDA in a mode that uses them
    ('reduce-overhead', 'max-autotune'; torch.compile's docstring). Each step is then marked as a new generation."""
    return bool(cfg.compile) and device_type == "cuda" and cfg.compile_mode in ("reduce-overhead", "max-autotune")


def ddp_wrapper(cfg: TrainConfig, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """DistributedDataParallel with the trainer's settings: no buffer broadcast (the networks keep no running
    statistics); gradient buckets of ``cfg.ddp_bucket_mb`` MiB, or PyTorch's own bucketing when it is 0 (DDP keeps
    its small first bucket only when no size is passed)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    bucket = {"bucket_cap_mb": cfg.ddp_bucket_mb} if cfg.ddp_bucket_mb > 0 else {}
    return functools.partial(DDP, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
                             **bucket)


def wrap_network(net: nn.Module, *, ddp: Optional[Callable[[nn.Module], nn.Module]] = None,
                 compile_fn: Optional[Callable[[nn.Module], nn.Module]] = None) -> Tuple[nn.Module, nn.Module]:
    """The two modules the consistency losses call, both running ``net``'s weights: ``(student, target)``.

    ``student`` runs the pass with gradients: ``net`` wrapped by ``ddp`` (several processes) and then by
    ``compile_fn`` (torch.compile), when given. ``target`` runs the stop-gradient target pass of ECT / SCT,
    which needs no gradient communication and so skips DDP: the student itself when there is no DDP wrapper,
    otherwise ``net`` with its own ``compile_fn`` wrapper, so that the target pass of a compiled DDP run is
    compiled as well (taking DDP off a compiled wrapper by its ``module`` attribute would also take the
    compiled code off).
    """
    student = ddp(net) if ddp is not None else net
    if compile_fn is not None:
        student = compile_fn(student)
    if ddp is None:
        return student, student
    return student, (compile_fn(net) if compile_fn is not None else net)


def broadcast_parameters(net: nn.Module, src: int = 0) -> None:
    """Copy process ``src``'s parameters and buffers into every process (``grad_sync='allreduce'``)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            buf = t.data.contiguous()  # channels-last weights: collectives take tensors contiguous in NCHW order
            dist.broadcast(buf, src)
            if buf.data_ptr() != t.data.data_ptr():
                t.data.copy_(buf)


def allreduce_mean(grads: List[torch.Tensor], world: int, check: bool = False) -> None:
    """Average gradients over the ``world`` processes in place: one all-reduce per dtype on a flat copy.

    ``grad_sync='allreduce'``: after the whole backward pass, so nothing overlaps it, but the compiled graph stays
    the one-process graph (DDP splits it at its buckets). The mean matches DDP's up to the order of the sums.
    ``check``: first make sure every process holds the same gradients (the flat buffers pair them by position);
    the trainer asks on its first step.
    """
    import torch.distributed as dist

    if check:
        counts = [None] * world
        dist.all_gather_object(counts, [(g.numel(), str(g.dtype)) for g in grads])
        if any(c != counts[0] for c in counts):
            n = [len(c) for c in counts]
            raise RuntimeError(f"grad_sync=allreduce: the processes hold different gradients ({n} tensors per rank): a "
                               "parameter got no gradient on some ranks; use grad_sync=ddp, which reports unused parameters")
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat)
        flat.div_(world)
        for g, f in zip(gs, flat.split([g.numel() for g in gs])):
            g.copy_(f.view(g.shape))


def gather_batch(images_uint8: torch.Tensor, labels: torch.Tensor, xflip: bool, idx: torch.Tensor):
    """(x0, labels) of the items ``idx`` of a stored uint8 set on the device (``data_on_device``): the values
    ``EDMZipDataset.__getitem__`` gives (k / 127.5 - 1; item i >= N is image i - N flipped left-right)."""
    n = images_uint8.shape[0]
    k = idx % n
    x = images_uint8[k].to(torch.float32) / 127.5 - 1.0
    if xflip:
        x = torch.where((idx >= n).view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)
    return x, labels[k]


# ------------------------------------------------------------------------------------------------
# Distributed set-up.

def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local_rank


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda': CUDA is not available on this machine; use device=cpu (or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")


def _init_distributed(device: torch.device, world: int) -> None:
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _is_dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def leave_process_group() -> None:
    """Leave torch.distributed together at the end of a successful run: a barrier, then destroy the group. A
    process that exits while another still talks to it over gloo can abort that one ("terminate called without an
    active exception", seen once in CI). No-op outside torch.distributed."""
    if _is_dist():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Initial weights.

def _init_state_dict(path: str, ema: bool = True) -> Dict[str, torch.Tensor]:
    """State dict of an init source: a run dir, our .safetensors, a training checkpoint, or a foreign pickle.

    ``ema`` (``init_ema``): the EMA weights where the source has them, else the online (raw) weights.
    """
    p = Path(path)
    if p.is_dir():
        cand = p / "final.safetensors"
        if not ema and (p / "final_net.safetensors").exists():
            cand = p / "final_net.safetensors"  # final.* holds the EMA when the run had one
        if not cand.exists():
            ck = latest_checkpoint(p / "checkpoints")
            if ck is None:
                raise FileNotFoundError(f"init: {p} holds neither final.safetensors nor a checkpoint")
            cand = ck
        p = cand
    if not p.exists():
        hint = ""
        if p.suffix in (".pkl", ".pt"):
            hint = (" Published EDM/EDM2/ECT snapshots cannot be downloaded here: fetch the file on a connected "
                    "machine (see the README, 'Starting from published weights') and pass its local path.")
        raise FileNotFoundError(f"init: {p} does not exist.{hint}")
    if p.suffix in (".pkl", ".pt"):
        from .convert import state_dict_from_pickle

        sd, _info = state_dict_from_pickle(str(p), which="auto" if ema else "net")
        return sd
    if CKPT_RE.match(p.name):
        tree = checkpoints.load_tree(str(p))
        return (tree.get("ema") if ema else None) or tree["net"]
    from safetensors.torch import load_file

    return load_file(str(p))


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``ckpt_dir`` (None if there is none)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name))
    return found[-1] if found else None


def _git_sha() -> Optional[str]:
    try:
        return checkpoints.git_sha()
    except Exception:  # noqa: BLE001 - metadata only
        return None


class _StepBatches(torch.utils.data.Sampler):
    """Index lists of one rank's micro-batches, step after step, from a starting image count."""

    def __init__(self, trainer: "Trainer", start_nimg: int):
        self.stream, self.start = trainer.stream, start_nimg
        self.B, self.rank, self.per_rank, self.bg = (trainer.cfg.batch_size, trainer.rank, trainer.per_rank,
                                                     trainer.batch_gpu)

    def __iter__(self):
        nimg = self.start
        while True:
            mine = self.stream.indices(nimg, self.B)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            for j in range(0, self.per_rank, self.bg):
                yield mine[j:j + self.bg].tolist()
            nimg += self.B


# ------------------------------------------------------------------------------------------------
# The trainer.

class Trainer:
    """Holds the state of one run; :meth:`run` trains to ``cfg.total_nimg`` (resuming if possible)."""

    def __init__(self, cfg: TrainConfig, run_dir, *, progress: bool = True,
                 eval_fn: Optional[Callable[[nn.Module, int], dict]] = None, dataset=None,
                 allow_config_change: bool = False, command: Optional[str] = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        # --change-config: resume with settings that differ from the checkpoint's (recorded in history.jsonl)
        self.allow_config_change = allow_config_change
        self.command = command  # the CLI command line, for the resume advice of NonFiniteError
        self.last_checkpoint: Optional[Path] = None  # newest checkpoint written or resumed from
        self.streak_start_nimg: Optional[int] = None
        self.progress = progress
        self.eval_fn = eval_fn
        self.rank, self.world, self.local_rank = _dist_env()
        self.device = _resolve_device(cfg.device, self.local_rank)
        _init_distributed(self.device, self.world)
        self._check_config()

        # Data.
        # A dataset object may be passed directly (a torch Dataset with label_dim, shape and optionally
        # tensors()); cfg.dataset then only names it in the records.
        self.dataset = dataset if dataset is not None else data_mod.load_dataset(
            cfg.dataset, path=cfg.data_path, resolution=cfg.data_resolution, cond=cfg.cond, seed=cfg.seed)
        if cfg.cond and self.dataset.label_dim == 0:
            raise ConfigError(f"cond=True but dataset {cfg.dataset!r} has no labels")
        self.in_memory = hasattr(self.dataset, "tensors")
        key = "data_on_device" if cfg.data_on_device else "data_preload"
        if (cfg.data_preload or cfg.data_on_device) and not self.in_memory and not hasattr(self.dataset, "preload"):
            if self.rank == 0:
                print(f"{key}: data set {cfg.dataset!r} cannot be preloaded; it is read as it is used", flush=True)
        elif (cfg.data_preload or cfg.data_on_device) and not self.in_memory:
            t0 = time.time()
            self.dataset.preload(progress=progress and self.rank == 0)
            if self.rank == 0:
                n = getattr(self.dataset, "num_images", len(self.dataset))
                print(f"{key}: {n} images decoded in {time.time() - t0:.1f} s", flush=True)
        if self.in_memory:
            X, y = self.dataset.tensors()
            self.X, self.y = X.to(self.device), y.to(self.device)
        # data_on_device: (uint8 stored images, labels, xflip) on the device; batches are gathered there.
        self._on_device = None
        if cfg.data_on_device and not self.in_memory and hasattr(self.dataset, "stored_uint8"):
            X8, y8 = self.dataset.stored_uint8(self.device)
            self._on_device = (X8, y8, bool(getattr(self.dataset, "xflip", False)))
            if self.rank == 0:
                unused = f"; workers={cfg.workers} unused (no DataLoader)" if cfg.workers else ""
                print(f"data_on_device: {X8.shape[0]} images, {X8.numel() / 2**20:.0f} MiB on {self.device}{unused}",
                      flush=True)
        elif cfg.data_on_device and not self.in_memory and hasattr(self.dataset, "preload") and self.rank == 0:
            print(f"data_on_device: data set {cfg.dataset!r} has no stored_uint8(); it is preloaded into host memory "
                  "and read through the DataLoader", flush=True)
        # How the processes combine gradients (cfg.grad_sync): DDP, or one all-reduce after the backward pass.
        self._ddp_sync = self.world > 1 and cfg.grad_sync == "ddp"
        self._allreduce_sync = self.world > 1 and cfg.grad_sync == "allreduce"
        self._grads_checked = False
        if self._allreduce_sync and cfg.ddp_bucket_mb and self.rank == 0:
            print(f"ddp_bucket_mb={cfg.ddp_bucket_mb:g} unused: grad_sync=allreduce all-reduces the whole gradient once",
                  flush=True)
        self.stream = IndexStream(len(self.dataset), cfg.seed)
        self._loader = None

        # Network, EMA, optimizer, loss.
        torch.manual_seed(seed_for(cfg.seed, 0xC0FFEE))  # initial weights
        self.net = build_network(cfg.net).to(self.device).train()
        if cfg.init:
            sd = _init_state_dict(cfg.init, ema=cfg.init_ema)
            self._load_weights(self.net, sd, f"init {cfg.init}")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
            if cfg.channels_last and cfg.net.arch != "mlp":
                self.net = self.net.to(memory_format=torch.channels_last)
        if self._allreduce_sync:
            # What DDP does when it wraps: every process starts from rank 0's weights (before the EMA copies them).
            broadcast_parameters(self.net)
        self.ema = EMA(self.net, cfg.ema_halflife_nimg, cfg.ema_rampup_ratio) if cfg.ema_halflife_nimg > 0 else None
        self.phema = PowerFunctionEMA(self.net, cfg.phema_stds) if cfg.phema_stds else None
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt_cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg.optim.name]
        impl = {"fused": True} if cfg.optim.impl == "fused" else {}  # {}: PyTorch's default, foreach on CUDA
        self.opt = opt_cls(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, **impl)
        self.loss_fn = build_loss(cfg.loss, references=self._build_references())
        refs = getattr(self.loss_fn, "references", None)
        # 'all': the loss gets the step's whole global batch as its reference set with every call (step_batch)
        self._wants_step_batch = isinstance(refs, GatheredReferences) and refs.kind == "all"
        # The precision rule answers "which format now?" per step (sctlib.precision); a scaler exists
        # whenever some stage runs in fp16, so that its state is checkpointed across a switch.
        self.precision_rule = PrecisionRule.parse(cfg.precision, self.device.type)
        self.nimg = 0
        self.precision = self.precision_rule.format_at(self._stage())
        if self.device.type == "cuda":
            set_tf32(self.precision, cfg.tf32)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision_rule.uses_fp16 else None

        ddp = ddp_wrapper(cfg, self.device) if self._ddp_sync else None
        compile_fn = None
        if cfg.compile and self.device.type == "cuda":
            # CUDA only: the presets compile by default, and on a CPU (tests, smoke runs) a compile costs minutes
            # for steps that take seconds.
            compile_fn = functools.partial(torch.compile, mode=cfg.compile_mode)
        elif cfg.compile and self.rank == 0:
            print(f"compile=true is applied on CUDA only; this run on {self.device.type} runs eager", flush=True)
        # self.ddp: the student pass (DDP and/or compiled); self.target_net: the ECT / SCT target pass.
        self.ddp, self.target_net = wrap_network(self.net, ddp=ddp, compile_fn=compile_fn)
        # CUDA graphs (the modes 'reduce-overhead' and 'max-autotune') replay into fixed buffers: each step is
        # marked as a new generation, so that the previous step's outputs may be overwritten.
        self._cudagraphs = uses_cudagraphs(cfg, self.device.type)

        # Progress state.
        self.nimg = 0
        self.step = 0
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0
        self.total_fp16_skipped = 0
        self.per_rank = cfg.batch_size // self.world
        self.batch_gpu = cfg.batch_gpu or self.per_rank
        self._reset_tick()

    def _build_references(self):
        """SCT's reference source from the config; 'dataset' gets this run's training set (on the device)."""
        cfg = self.cfg
        if cfg.loss.task != "sct":
            return None
        from .references import build_references

        if self.in_memory:
            data = (self.X, self.y)
        elif self._on_device is not None:  # the stored images already on the device: not decoded or held twice
            data = (self._on_device[0], self.dataset.labels())
        else:
            data = self.dataset
        return build_references(cfg.loss, dataset=data, num_classes=cfg.net.label_dim if cfg.cond else 0,
                                device=self.device, seed=cfg.seed)

    # -- configuration -------------------------------------------------------------------------
    def _check_config(self) -> None:
        cfg = self.cfg
        config_mod.validate(cfg)
        if cfg.batch_size <= 0 or cfg.batch_size % self.world:
            raise ConfigError(f"batch_size={cfg.batch_size} must be a positive multiple of the {self.world} processes")
        per_rank = cfg.batch_size // self.world
        bg = cfg.batch_gpu or per_rank
        if bg <= 0 or per_rank % bg:
            raise ConfigError(f"batch_gpu={cfg.batch_gpu} must divide the per-process batch {per_rank}")
        if cfg.total_nimg <= 0:
            raise ConfigError("total_nimg must be positive")
        if cfg.optim.name not in ("adam", "radam"):
            raise ConfigError(f"optim.name must be 'adam' or 'radam', got {cfg.optim.name!r}")
        PrecisionRule.parse(cfg.precision, self.device.type)  # raises a ConfigError naming the syntax
        if cfg.cond and cfg.net.label_dim == 0:
            raise ConfigError("cond=True needs net.label_dim > 0")
        if not cfg.cond and cfg.net.label_dim > 0:
            raise ConfigError("net.label_dim > 0 needs cond=True (or set net.label_dim=0)")
        if any(not 0.0 < f < 1.0 for f in cfg.snapshot_fracs):
            raise ConfigError(f"snapshot_fracs must lie strictly between 0 and 1, got {tuple(cfg.snapshot_fracs)}")

    def _stage(self) -> float:
        """The stage exponent a now (ECT staircase or SCT smooth; 0 for a diffusion teacher)."""
        return float(self.loss_fn.stage(self.nimg))

    def _select_format(self) -> str:
        """Ask the precision rule for this step's format; switch the TF32 flags when it changes."""
        fmt = self.precision_rule.format_at(self._stage())
        if fmt != self.precision and self.device.type == "cuda":
            set_tf32(fmt, self.cfg.tf32)
        self.precision = fmt
        return fmt

    def _autocast(self):
        return precision_autocast(self.precision, self.device.type)

    @staticmethod
    def _load_weights(module: nn.Module, sd: Dict[str, torch.Tensor], what: str) -> None:
        own = module.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
               if k in sd and sd[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise ValueError(
                f"{what} does not fit the configured network: {len(missing)} missing keys {missing[:5]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:5]}, {len(bad)} shape mismatches {bad[:5]}")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})

    # -- data ----------------------------------------------------------------------------------
    def _microbatches(self):
        """Yield (global offset, x0, labels) for this rank's share of the step at ``self.nimg``."""
        idx = self.stream.indices(self.nimg, self.cfg.batch_size)
        mine = idx[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        for j in range(0, self.per_rank, self.batch_gpu):
            sel = mine[j:j + self.batch_gpu]
            if self.in_memory:
                sel_d = self._indices_to_device(sel)
                x0, y = self.X[sel_d], self.y[sel_d]
            elif self._on_device is not None:
                x0, y = gather_batch(*self._on_device, self._indices_to_device(sel))
            else:
                if self._loader is None:
                    self._loader = iter(self._make_loader())
                x0, y = next(self._loader)
                x0 = x0.to(self.device, non_blocking=True)
                y = torch.as_tensor(y, dtype=torch.int64).to(self.device, non_blocking=True)
            if self.cfg.channels_last and x0.ndim == 4 and self.device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            yield self.rank * self.per_rank + j, x0, (y if self.cfg.cond else None)

    def _grad_is_finite(self, norm: torch.Tensor) -> bool:
        """Whether the step's gradient norm is finite: the one host sync per step, since the skip decision (and
        with it the optimizer step) is taken on the host. benchmarks/train_throughput.py's '+no-sync' rows replace
        it with ``True`` to measure what the sync costs (same numbers while every step is finite)."""
        return bool(torch.isfinite(norm))

    def _global_batch(self, micro) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(x0, labels) of the whole step in global order: this rank's micro-batches in order (rank r holds positions
        r * per_rank ...), gathered from every rank as the 'all' source gathers a batch."""
        x = torch.cat([x0 for _, x0, _ in micro])
        y = None if micro[0][2] is None else torch.cat([lab for _, _, lab in micro])
        return gather_references(x, y, "all")

    def _indices_to_device(self, sel: torch.Tensor) -> torch.Tensor:
        """The batch's indices on the device. On CUDA through pinned memory without blocking: a copy from pageable
        memory synchronises the stream, so the host would wait for the previous step's optimizer and EMA kernels
        before it could launch the next forward pass."""
        if self.device.type == "cuda":
            return sel.pin_memory().to(self.device, non_blocking=True)
        return sel.to(self.device)

    def _make_loader(self):
        """A DataLoader whose batch sampler yields this rank's micro-batches from ``self.nimg`` on."""
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_StepBatches(self, self.nimg), num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.cfg.workers > 0 else None)

    # -- stats ---------------------------------------------------------------------------------
    def _reset_tick(self) -> None:
        nb = len(T_BIN_EDGES) + 1
        dev = self.device
        self.acc = {
            "loss_sum": torch.zeros((), dtype=torch.float64, device=dev),
            "loss_sq": torch.zeros((), dtype=torch.float64, device=dev),
            "count": torch.zeros((), dtype=torch.float64, device=dev),
            "nonfinite": torch.zeros((), dtype=torch.float64, device=dev),
            "res_sum": torch.zeros(nb, dtype=torch.float64, device=dev),
            "res_sq": torch.zeros(nb, dtype=torch.float64, device=dev),
            "res_n": torch.zeros(nb, dtype=torch.float64, device=dev),
            # SCT target diagnostics: sums over samples, overall and per t bin.
            "sct_n": torch.zeros(nb, dtype=torch.float64, device=dev),
            "sct_ess": torch.zeros(nb, dtype=torch.float64, device=dev),
            "sct_mixed": torch.zeros(nb, dtype=torch.float64, device=dev),
            "sct_own": torch.zeros(nb, dtype=torch.float64, device=dev),
            "sct_no_other": torch.zeros((), dtype=torch.float64, device=dev),
        }
        self.tick_start_time = time.time()
        self.tick_start_nimg = self.nimg
        self.tick_skipped = 0
        self.tick_fp16_skipped = 0

    def _accumulate(self, loss: torch.Tensor, stats: dict) -> None:
        a = self.acc
        l = loss.detach().double()
        fin = torch.isfinite(l)
        a["loss_sum"] += torch.where(fin, l, 0).sum()
        a["loss_sq"] += torch.where(fin, l * l, 0).sum()
        a["count"] += fin.sum()
        a["nonfinite"] += (~fin).sum()
        if "residual" in stats and "t" in stats:
            # The bin edges live on the device from the first step on: torch.as_tensor(list, device=cuda)
            # every step was a pageable host-to-device copy, which waits for the queued step (a host sync).
            edges = getattr(self, "_t_bin_edges", None)
            if edges is None or edges.device != self.device:
                edges = self._t_bin_edges = torch.as_tensor(T_BIN_EDGES, dtype=torch.float64, device=self.device)
            t = stats["t"].detach().double().reshape(-1)
            bins = torch.bucketize(t, edges)
            if "ess" in stats and "own_weight" in stats:
                # Per sample: ESS = 1 / sum_i w_i^2; 'mixed' = the own image holds < 99% of the weight.
                own = stats["own_weight"].detach().double().reshape(-1)
                a["sct_n"].index_add_(0, bins, torch.ones_like(own))
                a["sct_ess"].index_add_(0, bins, stats["ess"].detach().double().reshape(-1))
                a["sct_mixed"].index_add_(0, bins, (own < 0.99).double())
                a["sct_own"].index_add_(0, bins, own)
                if "n_refs" in stats:  # no reference besides the own image: the target is ECT's
                    a["sct_no_other"] += (stats["n_refs"].detach().reshape(-1) <= 1).double().sum()
            res = stats["residual"].detach().double().reshape(-1)
            ok = torch.isfinite(res)
            a["res_sum"].index_add_(0, bins, torch.where(ok, res, 0))
            a["res_sq"].index_add_(0, bins, torch.where(ok, res * res, 0))
            a["res_n"].index_add_(0, bins, ok.double())

    def _write_tick(self, pbar) -> dict:
        a = self.acc
        if _is_dist():
            import torch.distributed as dist

            for v in a.values():
                dist.all_reduce(v)
        vals = {k: v.cpu().numpy() for k, v in a.items()}
        dt = max(time.time() - self.tick_start_time, 1e-9)
        n_finite = int(vals["count"].item())
        n = max(n_finite, 1.0)
        mean = vals["loss_sum"].item() / n
        res_n = np.maximum(vals["res_n"], 1.0)
        res_mean = vals["res_sum"] / res_n
        line = {
            "nimg": self.nimg,
            "step": self.step,
            # mean over the finite losses only; None (not 0.0) when a tick had none, e.g. inside a streak
            "loss": mean if n_finite else None,
            "loss_std": math.sqrt(max(vals["loss_sq"].item() / n - mean * mean, 0.0)) if n_finite else None,
            "loss_count": n_finite,
            "img_per_s": (self.nimg - self.tick_start_nimg) / dt,
            "lr": self.opt.param_groups[0]["lr"],
            "stage_exponent": float(self.loss_fn.stage(self.nimg)) if hasattr(self.loss_fn, "stage") else None,
            "nonfinite_losses": int(vals["nonfinite"].item()),
            "skipped_steps": self.tick_skipped,
            # fp16 steps skipped by the gradient scaler (overflow while the scale was >= 1; in skipped_steps too)
            "fp16_skipped_steps": self.tick_fp16_skipped,
            "precision": self.precision,
            "loss_scale": float(self.scaler.get_scale()) if self.scaler is not None else None,
            # Per t-bin mean and variance of the squared residual ||target - f(x_t, t)||^2 / d.
            "t_bin_edges": list(T_BIN_EDGES),
            "residual_mean": [float(x) for x in res_mean],
            "residual_var": [float(x) for x in np.maximum(vals["res_sq"] / res_n - res_mean**2, 0.0)],
            "residual_count": [int(x) for x in vals["res_n"]],
            "time": time.time(),
        }
        if self.cfg.loss.task == "sct":
            line.update(_sct_fields(vals))
        if self.device.type == "cuda":
            line["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.rank == 0:
            with open(self.run_dir / "stats.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")
            if pbar is not None:
                pbar.tick(mean, line["img_per_s"])
        self._reset_tick()
        return line

    # -- checkpoints ---------------------------------------------------------------------------
    def _ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _rng_state(self) -> dict:
        st = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def save_checkpoint(self) -> Optional[Path]:
        """Write ckpt-<nimg>.safetensors (+ per-rank files when distributed); keep the last K."""
        d = self._ckpt_dir()
        d.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{self.nimg:012d}"
        rank_state = {"loss": self.loss_fn.state_dict(), "rng": self._rng_state()}
        if self.world > 1:
            checkpoints.save_tree(str(d / f"{name}.rank{self.rank:03d}.safetensors"), rank_state)
            import torch.distributed as dist

            dist.barrier()
        path = d / f"{name}.safetensors"
        if self.rank == 0:
            tree = {
                "nimg": self.nimg,
                "step": self.step,
                "world": self.world,
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "total_nonfinite": self.total_nonfinite,
                "total_fp16_skipped": self.total_fp16_skipped,
                "net": self.net.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "phema": self.phema.state_dict() if self.phema else None,
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                **(rank_state if self.world == 1 else {}),
            }
            # The main file is written last: it is the commit marker of this checkpoint.
            checkpoints.save_tree(str(path), tree, meta={"config": config_mod.to_dict(self.cfg), "git": _git_sha()})
            self._prune(d)
        self.last_checkpoint = path
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return path

    def save_snapshot(self, frac: float) -> Optional[Path]:
        """snapshots/ema-<frac>.safetensors (+ .json): the sampling model at a fraction of training, the
        'bad' model of autoguidance. Kept apart from checkpoints/ so that keep_checkpoints never prunes it."""
        if self.rank != 0:
            return None
        d = self.run_dir / "snapshots"
        d.mkdir(parents=True, exist_ok=True)
        meta = {"nimg": self.nimg, "frac": frac, "preset": self.cfg.name, "git_sha": _git_sha(),
                "weights": "ema" if self.ema else "phema" if self.phema else "online",
                "config": config_mod.to_dict(self.cfg)}
        return checkpoints.save_model(str(d / f"ema-{frac:g}"), self.sample_model(),
                                      net_config=config_mod.to_dict(self.cfg.net), meta=meta)

    def _prune(self, d: Path) -> None:
        found = sorted(p for p in d.iterdir() if CKPT_RE.match(p.name))
        for old in found[: max(len(found) - max(self.cfg.keep_checkpoints, 1), 0)]:  # never the newest
            stem = old.name[: -len(".safetensors")]
            for p in d.glob(stem + ".*"):
                p.unlink(missing_ok=True)

    def try_resume(self) -> bool:
        """Load the newest readable checkpoint; return True if one was found."""
        d = self._ckpt_dir()
        if not d.is_dir():
            return False
        if self.rank == 0:
            for stale in d.glob(".ckpt-*.tmp"):  # left by a process killed while writing
                stale.unlink(missing_ok=True)
        cands = sorted((p for p in d.iterdir() if CKPT_RE.match(p.name)), reverse=True)
        for path in cands:
            try:
                stored = checkpoints.read_tree_meta(str(path)).get("config")
            except Exception as exc:  # noqa: BLE001 - an unreadable file is skipped, loudly
                print(f"[sctlib.train] skipping unreadable checkpoint {path.name}: {exc}", file=sys.stderr)
                continue
            # The run's config is compared before a single tensor is loaded (a different network would
            # otherwise fail with a raw size mismatch, and a different lr would resume silently).
            changed = self._compare_config(stored, path)
            try:
                tree = checkpoints.load_tree(str(path), map_location=self.device)
                if self.world > 1:
                    rank_tree = checkpoints.load_tree(
                        str(d / f"{path.name[:-12]}.rank{self.rank:03d}.safetensors"), map_location=self.device)
                else:
                    rank_tree = tree
            except Exception as exc:  # noqa: BLE001 - an unreadable file is skipped, loudly
                print(f"[sctlib.train] skipping unreadable checkpoint {path.name}: {exc}", file=sys.stderr)
                continue
            if tree.get("world", 1) != self.world and self.cfg.loss.ref_source == "bank":
                raise ConfigError(f"{path.name} was written by {tree.get('world')} processes; the SCT memory "
                                  f"bank is per process, so resume with the same number ({self.world} now)")
            self.net.load_state_dict(tree["net"])
            if self.ema:
                self.ema.load_state_dict(tree["ema"])
            if self.phema:
                self.phema.load_state_dict(tree["phema"])
            self.opt.load_state_dict(tree["optimizer"])
            if self.scaler and tree.get("scaler"):
                self.scaler.load_state_dict(tree["scaler"])
            self.loss_fn.load_state_dict(rank_tree.get("loss") or {})
            torch.set_rng_state(rank_tree["rng"]["cpu"].cpu())
            if self.device.type == "cuda" and "cuda" in rank_tree["rng"]:
                torch.cuda.set_rng_state(rank_tree["rng"]["cuda"].cpu(), self.device)
            self.nimg = int(tree["nimg"])
            self.step = int(tree["step"])
            self.consecutive_nonfinite = int(tree["consecutive_nonfinite"])
            self.total_nonfinite = int(tree["total_nonfinite"])
            self.total_fp16_skipped = int(tree.get("total_fp16_skipped", 0))
            self._reset_tick()
            self.last_checkpoint = path
            if self.rank == 0:
                rundir.append_history(self.run_dir, {"event": "resume", "nimg": self.nimg, "checkpoint": path.name,
                                                     **({"changed": changed} if changed else {})})
                print(f"[sctlib.train] resumed from {path} at {self.nimg} images"
                      + (f" with changed settings {changed}" if changed else ""), file=sys.stderr)
            return True
        return False

    def _compare_config(self, stored: Optional[dict], path: Path) -> dict:
        """Changed (non-resumable) keys vs the checkpoint's config; raises unless ``allow_config_change``."""
        if stored is None:  # a checkpoint without a stored config: fall back to config.json
            cj = self.run_dir / "config.json"
            stored = json.loads(cj.read_text()).get("config") if cj.is_file() else None
        if not isinstance(stored, dict):
            if self.allow_config_change:
                return {}
            raise rundir.RunDirError(f"{path} records no config, so it cannot be checked against this one; add "
                                     "--change-config to resume from it anyway, or use a new --run-dir")
        diff = rundir.compare_configs(stored, config_mod.to_dict(self.cfg), resumable=RESUMABLE_KEYS,
                                      allow_change=self.allow_config_change, where=str(self.run_dir),
                                      defaults=config_mod.to_dict(TrainConfig()))
        return {k: list(v) for k, v in diff.items()}

    def _nonfinite_message(self, step_nimg: int) -> str:
        """Where the streak started, the newest checkpoint before it and the command that resumes from it."""
        cfg = self.cfg
        head = (f"{self.consecutive_nonfinite} consecutive steps with non-finite loss or gradients (images "
                f"{self.streak_start_nimg}..{self.nimg}, the last at step {self.step - 1})")
        lower = f"optim.lr={cfg.optim.lr / 4:g}"
        if self.last_checkpoint is None:
            return (f"{head}; no checkpoint was written before the streak, so start over in a new --run-dir with a "
                    f"lower learning rate ({lower}), precision=fp32, or check the data")
        if self.command:
            cmd = f"{self.command} {lower} --change-config"
        else:
            cmd = (f"python -m sctlib.train --preset {cfg.name} --run-dir {shlex.quote(str(self.run_dir))} "
                   f"<your overrides> {lower} --change-config")
        return (f"{head}; the newest checkpoint before the streak is {self.last_checkpoint}. To resume from it with "
                f"a lower learning rate (or precision=fp32): {cmd}")

    # -- config record -------------------------------------------------------------------------
    def _write_config(self) -> None:
        path = self.run_dir / "config.json"
        resolved = config_mod.to_dict(self.cfg)
        if path.exists() and latest_checkpoint(self._ckpt_dir()) is not None and not self.allow_config_change:
            # The same rule as the checkpoint's own config check: a setting added to sctlib after the run started
            # is unchanged when it has its default (runs from before optim.impl / compile_mode resume).
            rundir.compare_configs(json.loads(path.read_text()).get("config", {}), resolved,
                                   resumable=RESUMABLE_KEYS, allow_change=False, where=str(self.run_dir),
                                   defaults=config_mod.to_dict(TrainConfig()))
        record = {
            "config": resolved,
            "git_sha": _git_sha(),
            "world_size": self.world,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor(),
            "precision": self.precision_rule.describe(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "seed_rule": "micro-batch seed = seed_for(seed, images seen + global offset of the micro-batch)",
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)

    # -- samples -------------------------------------------------------------------------------
    def sample_model(self) -> nn.Module:
        return self.ema.model if self.ema else self.phema.models[0] if self.phema else self.net

    @torch.no_grad()
    def write_samples(self, tag: str) -> Optional[Path]:
        if self.rank != 0:
            return None
        model = self.sample_model()
        was_training = model.training
        model.eval()
        g = torch.Generator(device=self.device).manual_seed(seed_for(self.cfg.seed, 0x6A1D))
        shape = tuple(self.dataset.shape)
        n = 64 if len(shape) > 1 else 2000
        noise = torch.randn((n, *shape), generator=g, device=self.device)
        labels = (torch.arange(n, device=self.device) % self.cfg.net.label_dim) if self.cfg.cond else None
        out_dir = self.run_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{tag}.png"
        from .evaluate import sampler_for

        sample = sampler_for(self.cfg)  # Heun for a teacher, phased sampling for a phased model
        rows = []
        for k in sample.default_steps:
            x = sample(model, noise, labels, steps=k, generator=g)
            rows.append((f"Heun {2 * k - 1} NFE" if sample.kind == "heun" else f"{k} step{'s' * (k > 1)}"
                         + (" (phased)" if sample.kind == "phased" else ""), x))
        if len(shape) > 1:
            data_mod.save_image_grid(torch.cat([r[1] for r in rows]), path, nrow=8)
        else:
            _scatter_png(rows, path, self.X[:n].cpu() if self.in_memory else None)
        model.train(was_training)
        return path

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``cfg.total_nimg`` holding the run directory's lock (one run per directory)."""
        lock = rundir.RunLock(self.run_dir) if self.rank == 0 else contextlib.nullcontext()
        if self.rank != 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with lock:
            if self.rank == 0:
                rundir.clean_stale_tmp(self.run_dir)  # temp files of a writer killed mid-write
            return self._run()

    def _run(self) -> dict:
        cfg = self.cfg
        resumed = self.try_resume()
        if self.rank == 0:
            for log in ("stats.jsonl", "evals.jsonl"):  # ticks replayed after the resume point are written again
                rundir.truncate_jsonl(self.run_dir / log, self.nimg)
        if self.rank == 0:
            self._write_config()
        if not resumed and self.rank == 0:
            self.write_samples(f"{0:012d}")
        pbar = None
        if self.progress and self.rank == 0:
            # Text lines, not a widget: they show in terminals, notebooks and papermill logs alike.
            from .progress import TextProgress

            pbar = TextProgress(cfg.total_nimg, self.nimg, desc=cfg.name)
        t_start = time.time()
        last_line = None
        while self.nimg < cfg.total_nimg:
            try:
                self.train_step()
            except NonFiniteError:
                self._write_tick(pbar)  # the log records the skipped steps before the run stops
                if pbar is not None:
                    pbar.close()
                raise
            if pbar is not None:
                pbar.update(cfg.batch_size)
            prev = self.nimg - cfg.batch_size
            crossed = lambda every: every > 0 and self.nimg // every > prev // every  # noqa: E731
            done = self.nimg >= cfg.total_nimg
            if crossed(cfg.tick_nimg) or done:
                last_line = self._write_tick(pbar)
            if self.eval_fn is not None and (crossed(cfg.eval.every_nimg) or done) and self.rank == 0:
                self._run_eval()
            if crossed(cfg.sample_nimg):
                self.write_samples(f"{self.nimg:012d}")
            for frac in cfg.snapshot_fracs:  # EMA snapshots for autoguidance (SCT Sec. 4.4): never pruned
                at = int(round(frac * cfg.total_nimg))
                if prev < at <= self.nimg:
                    self.save_snapshot(frac)
            # never inside a non-finite streak: the checkpoint named by NonFiniteError is the one before it
            if (crossed(cfg.checkpoint_nimg) or done) and self.consecutive_nonfinite == 0:
                self.save_checkpoint()
        if pbar is not None:
            pbar.close()
        return self.finish(time.time() - t_start, last_line)

    def _run_eval(self) -> None:
        model = self.sample_model()
        result = dict(self.eval_fn(model, self.nimg) or {})
        result["nimg"] = self.nimg
        with open(self.run_dir / "evals.jsonl", "a") as fh:
            fh.write(json.dumps(result) + "\n")

    def train_step(self) -> None:
        cfg = self.cfg
        # Learning rate (EDM2 inverse-sqrt or constant), a function of images seen.
        lr = schedules.lr_at(self.nimg, lr=cfg.optim.lr, schedule=cfg.optim.lr_schedule,
                             ref_nimg=cfg.optim.lr_ref_nimg, rampup_nimg=cfg.optim.lr_rampup_nimg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        scaler = self.scaler if self._select_format() == "fp16" else None  # idle outside fp16 stages
        micro = list(self._microbatches())
        step_refs = self._global_batch(micro) if self._wants_step_batch else None
        for i, (offset, x0, labels) in enumerate(micro):
            # Seeds derive from (seed, images seen + global position): resumption and any process split
            # draw the same t, eps and dropout masks.
            torch.manual_seed(seed_for(cfg.seed, self.nimg + offset))
            sync = contextlib.nullcontext()
            if self._ddp_sync and i < len(micro) - 1:
                sync = self.ddp.no_sync()  # all-reduce only on the last micro-batch
            with sync:
                with self._autocast(), _phase("loss"):
                    loss, stats = self.loss_fn(self.ddp, x0, labels, nimg=self.nimg,
                                               target_net=self.target_net,
                                               step_batch=None if step_refs is None else StepBatch(*step_refs, offset))
                # Mean over the global batch: DDP averages over processes, hence the factor world.
                obj = loss.float().sum() * (self.world / cfg.batch_size)
                # (no profiler range here: on CUDA autograd runs the backward pass on its own thread, outside it)
                if scaler is not None:
                    scaler.scale(obj).backward()
                else:
                    obj.backward()
            self._accumulate(loss, stats)
        del step_refs  # the global batch is not kept through the optimizer and EMA steps

        params = [p for p in self.net.parameters() if p.grad is not None]
        if self._allreduce_sync:
            with _phase("allreduce"):
                allreduce_mean([p.grad for p in params], self.world, check=not self._grads_checked)
            self._grads_checked = True
        with _phase("grad_norm"):
            if scaler is not None:
                scaler.unscale_(self.opt)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params]))) \
                if params else torch.zeros((), device=self.device)
            finite = self._grad_is_finite(norm)
        if finite:
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            with _phase("optimizer"):
                if scaler is not None:
                    scaler.step(self.opt)
                else:
                    self.opt.step()
            self.consecutive_nonfinite = 0
        elif scaler is not None and scaler.get_scale() >= 1.0:
            # fp16 overflow while the scaler is still searching for its scale: an expected skip (the
            # scale halves in update()), counted apart and not towards max_nonfinite_steps. Once the
            # scale is below 1 the gradients overflow unamplified and count as non-finite steps.
            self.total_fp16_skipped += 1
            self.tick_fp16_skipped += 1
            self.tick_skipped += 1
        else:
            if self.consecutive_nonfinite == 0:
                self.streak_start_nimg = self.nimg
            self.consecutive_nonfinite += 1
            self.total_nonfinite += 1
            self.tick_skipped += 1
        if scaler is not None:
            scaler.update()
        step_nimg = self.nimg
        self.nimg += cfg.batch_size
        self.step += 1
        if not finite and self.consecutive_nonfinite >= cfg.max_nonfinite_steps:
            raise NonFiniteError(self._nonfinite_message(step_nimg))
        with _phase("ema"):
            if self.ema:
                self.ema.update(self.net, self.nimg, cfg.batch_size)
            if self.phema:
                self.phema.update(self.net, self.nimg, cfg.batch_size)

    def finish(self, wall_s: float, last_line: Optional[dict]) -> dict:
        meta = {"nimg": self.nimg, "git_sha": _git_sha(), "preset": self.cfg.name, "task": self.cfg.loss.task,
                "config": config_mod.to_dict(self.cfg)}
        if self.rank == 0:
            net_cfg = config_mod.to_dict(self.cfg.net)
            if self.ema:
                checkpoints.save_model(str(self.run_dir / "final"), self.ema.model, net_config=net_cfg,
                                       meta={**meta, "weights": "ema", "ema_halflife_nimg": self.cfg.ema_halflife_nimg})
                checkpoints.save_model(str(self.run_dir / "final_net"), self.net, net_config=net_cfg,
                                       meta={**meta, "weights": "online"})
            else:
                checkpoints.save_model(str(self.run_dir / "final"), self.net, net_config=net_cfg,
                                       meta={**meta, "weights": "online"})
            if self.phema:
                for s, m in zip(self.phema.stds, self.phema.models):
                    checkpoints.save_model(str(self.run_dir / f"final_phema-{s:.3f}"), m, net_config=net_cfg,
                                           meta={**meta, "weights": "phema", "sigma_rel": s})
            self.write_samples("final")
        return {"nimg": self.nimg, "steps": self.step, "wall_s": wall_s, "skipped_steps": self.total_nonfinite,
                "fp16_skipped_steps": self.total_fp16_skipped,
                "last_tick": last_line, "run_dir": str(self.run_dir)}


def _sct_fields(vals: dict) -> dict:
    """stats.jsonl fields of SCT's target diagnostics from the tick sums (per t bin and overall)."""
    n_b = vals["sct_n"]
    n = max(float(n_b.sum()), 1.0)
    per_bin = lambda k: [float(v) / c if c > 0 else None for v, c in zip(vals[k], n_b)]  # noqa: E731
    return {
        "sct_ess_mean": float(vals["sct_ess"].sum()) / n,
        "sct_frac_mixed": float(vals["sct_mixed"].sum()) / n,
        "sct_own_weight_mean": float(vals["sct_own"].sum()) / n,
        "sct_no_other_ref": float(vals["sct_no_other"]) / n,  # fraction whose reference set is their own image
        "sct_ess_bins": per_bin("sct_ess"),
        "sct_frac_mixed_bins": per_bin("sct_mixed"),
    }


def _scatter_png(rows, path: Path, data: Optional[torch.Tensor]) -> None:
    # A bare Figure with its own Agg canvas: no pyplot, so the caller's backend (e.g. inline plots in a
    # notebook) is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * (len(rows) + 1), 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(rows) + (data is not None))
    panels = ([("data", data)] if data is not None else []) + list(rows)
    for ax, (title, x) in zip(np.atleast_1d(axes), panels):
        x = x.detach().float().cpu()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def train(cfg: TrainConfig, run_dir, *, progress: bool = True,
          eval_fn: Optional[Callable[[nn.Module, int], dict]] = None, dataset=None,
          allow_config_change: bool = False, command: Optional[str] = None) -> dict:
    """Train (or resume) one run into ``run_dir``; returns a summary dict.

    ``eval_fn(model, nimg) -> dict`` is called every ``cfg.eval.every_nimg`` images and at the end (results in
    ``evals.jsonl``); ``dataset`` replaces the one named by ``cfg.dataset``. A run directory holds one run:
    resuming with different settings is refused unless ``allow_config_change`` (CLI ``--change-config``),
    and then recorded in ``history.jsonl``.
    """
    return Trainer(cfg, run_dir, progress=progress, eval_fn=eval_fn, dataset=dataset,
                   allow_config_change=allow_config_change, command=command).run()


def launch(preset: str, run_dir, overrides=(), *, nproc: int = 1, progress: bool = True) -> dict:
    """Run ``python -m sctlib.train`` for a preset: in this process (nproc=1) or under torchrun (nproc>1).

    Pipelines use this so that one notebook drives a single- or multi-GPU run with the same arguments;
    the resolved config is validated here first, so a typo fails before any process starts.
    """
    overrides = list(overrides)
    cfg = resolve_config(preset, overrides)
    if nproc <= 1:
        return train(cfg, run_dir, progress=progress)
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "sctlib.train", "--preset", preset, "--run-dir", str(run_dir), *overrides]
    if not progress:
        cmd.insert(cmd.index("--preset"), "--no-progress")
    # Stream rank 0's progress lines to this process's stdout (a notebook cell, papermill's log) as they
    # come; the last stdout line is the run's JSON summary.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = ""
    for out_line in proc.stdout:
        if out_line.strip():
            last = out_line
            if not out_line.lstrip().startswith("{"):
                print(out_line, end="", flush=True)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"torchrun failed with exit code {proc.returncode}:\n{err[-4000:]}")
    return json.loads(last)


def load_run(run_dir, which: str = "final"):
    """Load a finished run's network: ``which`` is 'final' (EMA if any), 'final_net' or 'final_phema-0.050'."""
    model, info = checkpoints.load_model(str(Path(run_dir) / which))
    return model.eval(), info


# ------------------------------------------------------------------------------------------------
# CLI.

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sctlib.train",
        description="Train a diffusion teacher (task edm) or tune it with ECT / SCT. Overrides use the config's "
                    "field names, dotted for nested configs: total_nimg=64000 loss.q=4 net.dropout=0.1.")
    p.add_argument("--preset", help="named preset (see --list-presets)")
    p.add_argument("--run-dir", help="output folder; re-running the same command resumes from it")
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--change-config", action="store_true",
                   help="resume a run with settings that differ from its checkpoint (e.g. a lower lr after a "
                        "blow-up); the change is recorded in the run's history.jsonl")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def resolve_config(preset: str, overrides) -> TrainConfig:
    cfg = config_mod.get_preset(preset)
    return config_mod.validate(config_mod.override(cfg, **config_mod.parse_overrides(overrides)))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.list_presets:
        for name in sorted(config_mod.PRESETS):
            print(name)
        return 0
    # Expected failures (bad keys or values, files, run directory, non-finite streak, full disk) are one
    # line on stderr with exit code 2 (sctlib.errors.cli_main).
    return cli_main(lambda: _main(args))


def _main(args) -> int:
    if not args.preset:
        raise ConfigError("--preset is required; valid presets: " + ", ".join(sorted(config_mod.PRESETS)))
    cfg = resolve_config(args.preset, args.overrides)
    if args.print_config:
        print(json.dumps(config_mod.to_dict(cfg), indent=2))
        return 0
    if not args.run_dir:
        raise ConfigError("--run-dir is required")
    command = shlex.join(["python", "-m", "sctlib.train", "--preset", args.preset, "--run-dir", args.run_dir,
                          *args.overrides] + (["--no-progress"] if args.no_progress else []))
    summary = train(cfg, args.run_dir, progress=not args.no_progress, allow_config_change=args.change_config,
                    command=command)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "last_tick"}))
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
