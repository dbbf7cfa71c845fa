"""The probe: exact, streaming attention statistics and CKA for ViT-family models.

Layers of the pipeline, each a small module:
- `capture`: intercepts the (q, k, bias) a block hands to fused attention, without changing the model's output;
- `attention_stats`: the statistics' definition, from attention logits to per-image, per-head sums (torch);
- `backends`: where they are computed (the torch definition, the fused C kernel on the CPU, Triton on CUDA),
  picked by `select_backend`; every backend returns the same named `ChunkSums`;
- `families`: per-family adapters (timm ViT/DeiT/BEiT/Eva/Swin/SwinV2, Hugging Face models);
- `model_probe`: one model's state during a pass; `accumulate`: float64 means with a streaming Poisson bootstrap;
  `cka`: unbiased minibatch HSIC / linear CKA;
- `api`: `probe(models, images, ProbeConfig)`; `run`: the `mimlab probe` job (`run_probe`); `online`: the
  pretraining callback. `reference` is the float64 test oracle, imported only by tests and benchmarks.
"""
