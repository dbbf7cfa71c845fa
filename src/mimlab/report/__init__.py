"""Outputs of a probe result (the ``metrics.json`` dict): tidy tables (``tables``), figures (``figures``) and a
self-contained HTML report (``html``). ``from mimlab.report.html import render_all`` writes all three.

Submodules are imported on demand so that importing ``mimlab.report`` does not pull in matplotlib.
"""
