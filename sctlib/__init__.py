"""sctlib: Stable Consistency Tuning (SCT) and Easy Consistency Tuning (ECT) in PyTorch.

    import sctlib as sct
    cfg = sct.config.get_preset("digits-sct")
    sct.train.train(cfg, "runs/digits-sct")

Modules, one per concept: precond, schedules, targets, references, losses, samplers, networks, ema,
data, metrics, checkpoints, convert, config, precision, flops (model FLOPs and MFU), train, evaluate, book,
ablation, errors, rundir,
safepickle, paper (the published numbers and claims), pipeline and progress (plumbing of the papermill
pipelines). They are imported on first access (``sct.train``), so ``python -m sctlib.train`` does not
import itself twice and ``import sctlib`` is cheap.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["config", "precond", "schedules", "targets", "references", "ema", "losses", "networks", "samplers",
           "checkpoints", "convert", "data", "metrics", "precision", "evaluate", "train", "book", "ablation",
           "errors", "rundir", "safepickle", "paper", "pipeline", "progress", "flops"]


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'sctlib' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
