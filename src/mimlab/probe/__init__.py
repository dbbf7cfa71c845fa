"""The probe: exact, streaming attention statistics and CKA for ViT-family models.

Layers of the pipeline, each a small module:
- `capture`: intercepts the (q, k, bias) a block hands to fused attention, without changing the model's output;
- `attention_stats`: pure functions from attention logits to per-image, per-head sums (the formulas);
- `accumulate`: float64 running sums and a streaming (Poisson) bootstrap over images;
- `cka`: unbiased minibatch HSIC / linear CKA;
- `api`: `probe(...)` ties it together; `cli` is the `mimlab probe` verb.
"""
