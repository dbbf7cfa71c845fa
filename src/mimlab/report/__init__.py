"""Outputs of a probe result (the ``metrics.json`` dict): tidy tables (``tables``), figures (``figures``) and a
self-contained HTML report (``html``), and the study's page (``study``). `write_probe_report(metrics, out)` writes
the first three.

Submodules are imported on demand so that importing ``mimlab.report`` does not pull in matplotlib.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_probe_report(metrics: dict[str, Any], out_dir: str | os.PathLike, figure_options: Any = None
                       ) -> dict[str, Any]:
    """heads.csv, layers.csv, cka.csv, figures/*.png (+ PDF / SVG per ``figure_options``, a
    `report.options.FigureOptions`) and report.html for a probe's metrics.json dict."""
    from mimlab.report.html import render_all
    from mimlab.report.options import FigureOptions

    return render_all(metrics, Path(out_dir), figure_options or FigureOptions())
