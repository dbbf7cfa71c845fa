"""Classification metrics: top-1 accuracy and mean per-class accuracy (balanced accuracy)."""
from __future__ import annotations

import numpy as np

from mimlab.errors import MimlabError


def classification_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict[str, float]:
    """`top1` = mean(pred == target); `mean_class_acc` = mean over the classes present in `target` of
    (#correct in class c) / (#samples of class c)."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if pred.shape != target.shape or pred.size == 0:
        raise MimlabError(f"classification_metrics: need equal non-empty label arrays, got {pred.shape}, "
                          f"{target.shape}")
    if target.min() < 0 or target.max() >= num_classes:
        raise MimlabError(f"classification_metrics: target labels outside 0..{num_classes - 1}")
    correct = pred == target
    present = np.unique(target)
    per_class = [correct[target == c].mean() for c in present]
    return {"top1": float(correct.mean()), "mean_class_acc": float(np.mean(per_class))}


def majority_baseline(train_labels: np.ndarray, val_labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Predict the most frequent training class (lowest index on ties) for every validation sample."""
    counts = np.bincount(np.asarray(train_labels), minlength=num_classes)
    return classification_metrics(np.full(len(val_labels), int(counts.argmax())), np.asarray(val_labels),
                                  num_classes)
