"""Metrics: Frechet / kernel distances, FID and KID with torch-fidelity's InceptionV3 (weights installed offline
by ``python -m sctlib.metrics install-inception``), the digits classifier
(Frechet distance in its feature space, class accuracy), and exact metrics for the 2-D toys.

Importing this package needs neither torch-fidelity nor the Inception weights; they are loaded on first use.
"""
from .frechet import feature_stats, frechet_distance, frechet_distance_from_features, kernel_distance
from .inception import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    WEIGHTS_ENV,
    InceptionFeatures,
    InceptionWeightsMissing,
    compute_stats,
    extract_features,
    fid,
    fid_multi_seed,
    inception_reference_stats,
    kid,
    load_inception,
    load_reference_stats,
    resolve_inception_weights,
    streaming_stats,
)
from .inception_weights import (
    export_inception_tensors,
    fidelity_state_from_torchscript,
    install_inception,
    installed_inception_path,
    read_inception_tensors,
)
from .features import (
    DigitsClassifier,
    DigitsFeatures,
    class_accuracy,
    digits_classifier,
    digits_split,
    fd_digits,
    register_with_torch_fidelity,
)
from .toy import mode_coverage, sliced_wasserstein, toy_metrics, toy_nll

__all__ = [
    "feature_stats", "frechet_distance", "frechet_distance_from_features", "kernel_distance",
    "INCEPTION_FILENAME", "INCEPTION_URL", "WEIGHTS_ENV", "InceptionFeatures", "InceptionWeightsMissing",
    "resolve_inception_weights", "extract_features", "compute_stats", "streaming_stats", "load_reference_stats",
    "inception_reference_stats", "fid", "kid", "fid_multi_seed",
    "load_inception", "install_inception", "installed_inception_path", "read_inception_tensors",
    "fidelity_state_from_torchscript", "export_inception_tensors",
    "DigitsClassifier", "DigitsFeatures", "digits_classifier", "digits_split", "fd_digits", "class_accuracy",
    "register_with_torch_fidelity",
    "sliced_wasserstein", "toy_nll", "mode_coverage", "toy_metrics",
]
