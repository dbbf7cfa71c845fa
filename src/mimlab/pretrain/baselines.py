"""The loss of each pretraining objective's best trivial predictor: what "trained enough" is measured against."""
from __future__ import annotations

import math


def trivial_loss(method: str, *, num_classes: int | None = None, mean_colour_l1: float | None = None) -> float | None:
    """SimMIM: `mean_colour_l1` (`mimlab.pretrain.simmim.mean_colour_baseline`); supervised: ln(classes), the
    cross-entropy of a uniform prediction; MAE: 1, the norm-pix MSE of predicting each patch's mean. None when the
    needed number is unknown."""
    if method == "simmim":
        return mean_colour_l1 or None
    if method == "supervised":
        return math.log(num_classes) if num_classes else None
    if method == "mae":
        return 1.0
    return None
