"""Image-quality metrics (FID, improved precision/recall, KID, IS) on FID-Inception features.

Typical use (what `ddpmkit eval` does):

    from ddpmkit.metrics import (load_fid_inception, folder_batches, extract_features,
                                 load_or_compute_reference_stats, compute_metrics)
    model = load_fid_inception(device="cuda")
    features = extract_features(model, folder_batches("images/eval/cifar10", batch_size=256))
    results = compute_metrics(features, ref_stats, metrics=("fid", "pr"))

Names load on first use (PEP 562) so that `ddpmkit.metrics.toy` stays light.
"""

import importlib

# public name -> module that defines it
_LAZY = {
    "FIDInceptionV3": "inception",
    "INCEPTION_WEIGHTS": "weights",
    "InceptionFeatures": "inception",
    "WeightsFile": "weights",
    "extract_features": "inception",
    "load_fid_inception": "inception",
    "resolve_inception_weights": "weights",
    "resize_bilinear_tf1": "inception",
    "feature_statistics": "fid",
    "fid_from_features": "fid",
    "frechet_distance": "fid",
    "knn_radii": "precision_recall",
    "precision_recall": "precision_recall",
    "inception_score": "kid_is",
    "kernel_inception_distance": "kid_is",
    "ReferenceStats": "stats",
    "compute_reference_stats": "stats",
    "dataset_reference_stats": "stats",
    "load_or_compute_reference_stats": "stats",
    "load_reference_stats": "stats",
    "save_reference_stats": "stats",
    "dataset_batches": "folder",
    "folder_batches": "folder",
    "METRICS": "evaluate",
    "compute_metrics": "evaluate",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"ddpmkit.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ddpmkit.metrics' has no attribute {name!r}")


__all__ = list(_LAZY)
