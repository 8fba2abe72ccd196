"""sctlib: Stable Consistency Tuning (SCT) and Easy Consistency Tuning (ECT) in PyTorch.

    import sctlib as sct
    cfg = sct.config.get_preset("digits-sct")
    sct.train.train(cfg, "runs/digits-sct")

Modules, one per concept (see DESIGN.md): precond, schedules, targets, losses, samplers, networks, ema,
data, metrics, checkpoints, convert, config, train, evaluate, book.
"""
from . import config, precond, schedules, targets  # noqa: F401  (pure math and data first)
from . import ema, losses, networks, samplers  # noqa: F401
from . import checkpoints, convert, data  # noqa: F401
from . import metrics, evaluate, train, book  # noqa: F401

__version__ = "0.1.0"
__all__ = ["config", "precond", "schedules", "targets", "ema", "losses", "networks", "samplers", "checkpoints",
           "convert", "data", "metrics", "evaluate", "train", "book"]
