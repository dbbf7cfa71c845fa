"""mimlab: pretrain, probe, transfer and reproduce masked-image-modeling studies of ViTs."""
__version__ = "0.1.0"
