"""Probe throughput: plain forward (fused attention) vs the streaming probe vs materialise-all-maps.

Each method runs in its own subprocess (so peak memory is its own), on the same model, weights and images:
- forward:  `model.forward_features` with fused attention, nothing else (the speed of light);
- probe:    `mimlab.probe.api.probe` (attention statistics + CKA Grams + bootstrap), streaming, with its default
            statistics kernel (`--stats-kernel`; on the CPU the fused C kernel);
- probe_torch: the same with the statistics on the eager torch path (`kernel="torch"`), for comparison;
- extract:  timm's `AttentionExtract` stores every attention map of a batch, then the metrics are computed
            from the stored maps (attention statistics only, no CKA) — the approach of public notebooks.
- paired:   forward and probe alternately in one process, the probe/forward time ratio of every round (the VM
            this was written on changes speed by up to 2x from minute to minute; pairing cancels that), in
            alternating order (forward first in even rounds, probe first in odd ones).
Prints images/s (median of repeats), the ratio to the plain forward, peak memory, and the probe's largest
relative deviation from the float64 reference on the first images.

    python benchmarks/probe_throughput.py                       # ViT-S/16 at 224 on the CPU
    python benchmarks/probe_throughput.py --device cuda --model vit_base_patch16_224 --precision bf16 \\
        --batch-size 128 --images 1024
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def build(args):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=0, img_size=args.img_size).eval()
    with torch.no_grad():        # trained-like attention (random init is nearly uniform)
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    return model.to(args.device), x.to(args.device)


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(args) -> dict:
    import torch

    from mimlab.probe.api import ProbeConfig, probe

    torch.set_grad_enabled(False)
    model, x = build(args)
    batches = max(1, args.images // args.batch_size)
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16) if args.precision == "bf16" else None
    kernel = "torch" if args.method == "probe_torch" else args.stats_kernel
    cfg = ProbeConfig(bootstrap=args.bootstrap, cka=not args.no_cka, kernel=kernel)

    def forward():
        for _ in range(batches):
            if autocast is not None:
                with autocast:
                    model.forward_features(x)
            else:
                model.forward_features(x)

    def probe_all():
        probe({"m": model}, (x for _ in range(batches)), batch_size=args.batch_size, device=args.device,
              precision=args.precision, config=cfg)

    def extract():
        from timm.utils import AttentionExtract

        from mimlab.models.layout import inspect_layout
        from mimlab.probe.reference import reference_metrics

        lay = inspect_layout(model)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        ext = AttentionExtract(model, method="fx")
        for _ in range(batches):
            maps = ext(x)                                   # every layer's (B, H, N, N) maps, kept together
            for a in maps.values():
                reference_metrics(a.float().cpu().numpy(), lay.num_prefix_tokens, lay.grid, lay.patch_size)
        for blk in model.blocks:
            blk.attn.fused_attn = True

    if args.method == "paired":                             # forward and probe alternately, in one process
        forward()
        probe_all()
        ratios, tf, tp = [], [], []
        for r in range(args.repeats):       # the order flips every round: what runs second is not favoured
            first, second = (forward, probe_all) if r % 2 == 0 else (probe_all, forward)
            t0 = time.perf_counter()
            first()
            t1 = time.perf_counter()
            second()
            t2 = time.perf_counter()
            f, p = (t1 - t0, t2 - t1) if r % 2 == 0 else (t2 - t1, t1 - t0)
            tf.append(f)
            tp.append(p)
            ratios.append(p / f)
        # the machine's slow spells only ever add time: the fastest repeat of each is its least disturbed one
        return {"method": "paired", "ratios": ratios, "ratio_median": statistics.median(ratios),
                "ratio_of_minima": min(tp) / min(tf), "forward_s": tf, "probe_s": tp}
    fn = {"forward": forward, "probe": probe_all, "probe_torch": probe_all, "extract": extract}[args.method]
    fn()                                                    # warm-up (allocator, kernels, fx trace)
    sync(args.device)
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        t = time.perf_counter()
        fn()
        sync(args.device)
        times.append(time.perf_counter() - t)
    out = {"method": args.method, "img_per_s": batches * args.batch_size / statistics.median(times),
           "times": times, "peak_mb": peak_memory_mb(args.device)}
    if args.method in ("probe", "probe_torch"):
        out["max_rel_err"] = accuracy(model, x[: min(8, x.shape[0])], args, kernel)
    return out


def accuracy(model, x, args, kernel: str = "auto") -> float:
    """Largest relative deviation of the probe (as configured) from the float64 reference, over all metrics."""
    import numpy as np
    import torch

    from mimlab.models.layout import inspect_layout
    from mimlab.probe.api import ProbeConfig, probe
    from mimlab.probe.attention_stats import METRICS
    from mimlab.probe.reference import attention_maps_float64, reference_metrics

    lay = inspect_layout(model)
    cpu_model = model.float().cpu()
    maps = attention_maps_float64(cpu_model, x.float().cpu())
    model.to(args.device)
    res = probe({"m": model}, x, batch_size=x.shape[0], device=args.device, precision=args.precision,
                config=ProbeConfig(bootstrap=0, cka=False, kernel=kernel)).to_dict()
    worst = 0.0
    for li, a in enumerate(maps):
        ref = reference_metrics(a, lay.num_prefix_tokens, lay.grid, lay.patch_size)
        for m in METRICS:
            got = np.asarray(res["models"]["m"]["layers"][li][m])
            denom = np.maximum(np.abs(ref[m]), 1e-12)
            worst = max(worst, float(np.max(np.abs(got - ref[m]) / denom)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=64, help="images per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--no-cka", action="store_true")
    p.add_argument("--stats-kernel", default="auto", choices=["auto", "torch", "triton", "cpu"],
                   help="statistics kernel of the `probe` method (probe_torch always uses the torch path)")
    p.add_argument("--methods", default="forward,probe,probe_torch,extract,paired",
                   help="'paired' times forward and probe alternately in one process: the probe/forward ratio of "
                        "each round, robust to a machine whose speed drifts between the separate runs")
    p.add_argument("--method", help=argparse.SUPPRESS)          # internal: run one method in this process
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_method(args)))
        return
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method] + [a for a in sys.argv[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if r.returncode != 0:
            print(f"{method}: failed\n{r.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = next((r["img_per_s"] for r in results if r["method"] == "forward"), None)
    print(f"{args.model} @ {args.img_size}px, batch {args.batch_size}, {args.images} img/repeat, "
          f"{args.repeats} repeats, device {args.device}, {args.precision}")
    print(f"{'method':12s} {'img/s':>9s} {'time vs fwd':>12s} {'peak MB':>9s} {'max rel err':>12s}")
    for r in results:
        if r["method"] == "paired":
            rs = sorted(r["ratios"])
            print(f"paired: probe / forward in one process, {len(rs)} alternating rounds: median "
                  f"{r['ratio_median']:.2f}x (range {rs[0]:.2f}-{rs[-1]:.2f}); fastest probe / fastest forward "
                  f"{r['ratio_of_minima']:.2f}x ({min(r['probe_s']):.2f} s / {min(r['forward_s']):.2f} s)")
            continue
        ratio = base / r["img_per_s"] if base else float("nan")
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        print(f"{r['method']:12s} {r['img_per_s']:9.1f} {ratio:11.2f}x {r['peak_mb']:9.0f} {err:>12s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
