"""Pretraining: SimMIM, MAE and supervised, on the shared engine (`mimlab.engine`).

Python API: ``from mimlab.pretrain.api import PretrainConfig, pretrain``; CLI: ``mimlab pretrain``.
Import the submodules directly; this package imports nothing heavy.
"""
