"""sctlib: Stable Consistency Tuning (SCT) and Easy Consistency Tuning (ECT) in PyTorch."""
__version__ = "0.1.0"
