"""The fused Triton attention-statistics kernel on the GPU: speed against a plain forward, accuracy against torch.

Methods, on the same model, weights and images (bf16 autocast by default):
- forward: `model.forward_features` with fused attention, nothing else (the speed of light);
- fused:   the same forward with every block's SDPA call intercepted (as `capture_attention` does for the probe)
           and `fused_chunk_stats` run on its (q, k, bias): statistics of all patch queries, no attention map
           in memory;
- torch:   the same interception, statistics by `chunk_sums_tensors` on float32 logits, in batch chunks as the
           probe does (`--compile` also times the torch.compile'd version).
Prints img/s (median of repeats), the ratio to the plain forward, peak memory, and on `--check-images` images the
largest relative error of the kernel's per-image metrics (distance, KL, JS, entropy, prefix mass, NMI) against the
torch float32 path and against a float64 path (same captured q, k).

    python benchmarks/gpu_probe_kernel.py                              # ViT-B/16 @ 224, bf16, batch 128, CUDA
    python benchmarks/gpu_probe_kernel.py --configs 16x16x8,32x16x8 --compile
    TRITON_INTERPRET=1 python benchmarks/gpu_probe_kernel.py --device cpu --model vit_tiny_patch16_224 \\
        --img-size 64 --batch-size 2 --images 2 --repeats 1 --check-images 1     # CPU smoke run (interpreter)

Triton APIs used by the kernel: 3-D `tl.dot` with `input_precision`, `triton.language.extra.libdevice` (both in
Triton 3.0 and later).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=512, help="images per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--sharpen", type=float, default=4.0,
                   help="multiply the qkv weights (trained-like attention; random init is nearly uniform)")
    p.add_argument("--configs", default="16x16x8,16x16x4,16x32x8",
                   help="kernel block configs to time, BQxBKxWARPS, comma separated")
    p.add_argument("--no-js", action="store_true", help="kernel and torch path without Jensen-Shannon")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd torch path")
    p.add_argument("--torch-chunk", type=int, default=8, help="images per chunk on the torch path")
    p.add_argument("--check-images", type=int, default=4)
    p.add_argument("--methods", default="forward,fused,torch")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")     # must precede the first import of triton
    import timm
    import torch

    from mimlab.models.layout import attention_modules, inspect_layout
    from mimlab.probe.backends import triton_kernel as triton_stats
    from mimlab.probe.attention_stats import attention_logits, chunk_sums_tensors
    from mimlab.probe.capture import capture_attention

    torch.set_grad_enabled(False)
    dev = torch.device(args.device)
    if not triton_stats.is_available(dev):
        sys.exit(f"the fused kernel is not available on {dev} (triton importable: {triton_stats.triton is not None}; "
                 "CUDA, or TRITON_INTERPRET=1 with --device cpu)")
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=0, img_size=args.img_size).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(args.sharpen)
    model.to(dev)
    lay = inspect_layout(model)
    P = lay.num_prefix_tokens
    dist32 = lay.distance_matrix_px().to(dev, torch.float32)
    attn = attention_modules(model)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size,
                    generator=torch.Generator().manual_seed(0)).to(dev)
    batches = max(1, args.images // args.batch_size)
    js = not args.no_js

    def autocast():
        if args.precision == "bf16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return torch.autocast(dev.type, enabled=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def expand_mask(call):
        m = call.attn_mask
        if m is not None:
            while m.dim() < 4:
                m = m.unsqueeze(0)
        return m

    def run_forward(sink=None):
        for _ in range(batches):
            with autocast():
                if sink is None:
                    model.forward_features(x)
                else:
                    with capture_attention(attn, sink):
                        model.forward_features(x)

    def fused_sink(cfg):
        bq, bk, nw = cfg
        keep = []

        def sink(name, call):
            out = triton_stats.fused_chunk_stats(call.q, call.k, expand_mask(call), call.scale, P, dist32, js=js,
                                                 block_q=bq, block_k=bk, num_warps=nw)
            keep.append(out.finite)               # the finite flags: checked after timing, no host sync per block
        return sink, keep

    def torch_sink(kernel):
        keep = []

        def sink(name, call):
            q, k = call.q.float(), call.k.float()
            B, N = q.shape[0], q.shape[2]
            mask = expand_mask(call)
            for b0 in range(0, B, args.torch_chunk):
                b1 = min(B, b0 + args.torch_chunk)
                m = None if mask is None else (mask[b0:b1] if mask.shape[0] == B else mask)[..., P:, :]
                logits = attention_logits(q[b0:b1, :, P:], k[b0:b1], m, call.scale)
                out = kernel(logits, dist32, P, 1e-8, True, js)
                keep.append(out.finite)
        return sink, keep

    def timed(fn):
        fn()                                          # warm-up: autotuning, compilation, allocator
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
        return {"img_per_s": batches * args.batch_size / statistics.median(times), "times": times, "peak_mb": peak}

    results = []
    methods = args.methods.split(",")
    if "forward" in methods:
        results.append({"method": "forward", **timed(lambda: run_forward())})
    if "fused" in methods:
        for cfg_s in args.configs.split(","):
            cfg = tuple(int(v) for v in cfg_s.lower().split("x"))
            sink, keep = fused_sink(cfg)
            try:
                r = timed(lambda: run_forward(sink))
            except Exception as e:            # a config that does not compile (registers, shared memory): go on
                print(f"fused[{cfg_s}] failed: {type(e).__name__}: {str(e)[:500]}", file=sys.stderr)
                continue
            r["all_finite"] = bool(torch.stack(keep).all()) if keep else None
            results.append({"method": f"fused[{cfg_s}]", **r})
    if "torch" in methods:
        kernels = [("torch", chunk_sums_tensors)]
        if args.compile:
            kernels.append(("torch.compile", torch.compile(chunk_sums_tensors, dynamic=False)))
        for label, kern in kernels:
            sink, keep = torch_sink(kern)
            r = timed(lambda: run_forward(sink))
            r["all_finite"] = bool(torch.stack(keep).all()) if keep else None
            results.append({"method": label, **r})

    acc = accuracy(args, model, x[: args.check_images], attn, P, dist32, js, autocast) if args.check_images else {}

    import triton

    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (triton interpreter)"
    print(f"{args.model} @ {args.img_size}px, batch {args.batch_size}, {batches * args.batch_size} img/repeat, "
          f"{args.repeats} repeats, {args.precision}, js={js}; {gpu}; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    base = next((r["img_per_s"] for r in results if r["method"] == "forward"), None)
    print(f"{'method':22s} {'img/s':>9s} {'vs forward':>11s} {'peak MB':>9s}")
    for r in results:
        ratio = r["img_per_s"] / base if base else float("nan")
        print(f"{r['method']:22s} {r['img_per_s']:9.1f} {ratio:10.2f}x {r['peak_mb']:9.0f}"
              + ("" if r.get("all_finite", True) else "  NON-FINITE LOGITS"))
    if acc:
        print(f"kernel vs torch float32 path, max rel err over {args.check_images} images: "
              + ", ".join(f"{k} {v:.1e}" for k, v in acc["vs_float32"].items()))
        print(f"kernel vs float64 path:                    "
              + ", ".join(f"{k} {v:.1e}" for k, v in acc["vs_float64"].items()))
        print(f"torch float32 vs float64 path:             "
              + ", ".join(f"{k} {v:.1e}" for k, v in acc["float32_vs_float64"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": gpu, "torch": torch.__version__, "triton": triton.__version__,
                       "results": results, "accuracy": acc}, f, indent=2)


def accuracy(args, model, x, attn, P, dist32, js, autocast) -> dict:
    """Max relative error per metric (over layers, images, heads): kernel vs float32 / float64 torch paths."""
    import torch

    from mimlab.probe.backends import triton_kernel as triton_stats
    from mimlab.probe.attention_stats import ChunkSums, attention_logits, chunk_sums_tensors, finalize_image_stats
    from mimlab.probe.capture import capture_attention

    K = dist32.shape[0]
    uniform = float(dist32.double().mean())
    calls = []
    with autocast(), capture_attention(attn, lambda name, call: calls.append(call)):
        model.forward_features(x)

    def metrics(t: ChunkSums):
        return finalize_image_stats(ChunkSums(**{k: v.double().cpu() if k not in ("rowsum_err", "finite") else v
                                                 for k, v in vars(t).items()}), K, uniform)

    worst = {"vs_float32": {}, "vs_float64": {}, "float32_vs_float64": {}}
    for call in calls:
        m = call.attn_mask
        while m is not None and m.dim() < 4:
            m = m.unsqueeze(0)
        got = metrics(triton_stats.fused_chunk_stats(call.q, call.k, m, call.scale, P, dist32, js=js))
        refs = {}
        for dt in (torch.float32, torch.float64):
            mm = None if m is None else m[..., P:, :]
            logits = attention_logits(call.q[:, :, P:].to(dt), call.k.to(dt), mm, call.scale)
            refs[dt] = metrics(chunk_sums_tensors(logits, dist32.to(dt), P, 1e-8, True, js))
        for key, a, b in (("vs_float32", got, refs[torch.float32]), ("vs_float64", got, refs[torch.float64]),
                          ("float32_vs_float64", refs[torch.float32], refs[torch.float64])):
            for name in a:
                if name == "head_js" and not js:
                    continue
                err = float(((a[name] - b[name]).abs() / b[name].abs().clamp_min(1e-12)).max())
                worst[key][name] = max(worst[key].get(name, 0.0), err if math.isfinite(err) else float("inf"))
    return worst


if __name__ == "__main__":
    main()
