"""Which statistics path should the CPU probe use? All candidates timed in one process, interleaved.

ViT-S/16 at 224 px (attention sharpened: q/k weights x4, so rows are peaked as in trained models), batch 32, on
the CPU. Each round runs every method once, in an order rotated from round to round (no method always runs
first or last); the per-round time of each method is divided by that round's plain forward, and the medians of
those ratios are reported (this VM's speed drifts by up to 2x between minutes: only in-round ratios mean much).

Methods:
- forward:        `model.forward_features`, fused attention, nothing else;
- probe_torch:    `mimlab.probe` with the eager torch statistics (`kernel="torch"`);
- probe_compiled: the same with the torch statistics compiled by `torch.compile` (compile time reported apart:
                  the first call, and every new chunk shape, compiles);
- probe_c:        the fused C kernel (`kernel="cpu"`), when this checkout still has it.
Every probe computes all statistics, CKA Grams (flatten) and a 200-replicate bootstrap.

Also reported: each path's largest relative error against a float64 evaluation of the same statistics, on the
model's own attention and on synthetic peaked rows (top probability 0.5-0.99, logit spreads 100-200).

    python benchmarks/cpu_kernel_decision.py --rounds 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def build(model_name: str, img_size: int, batch: int):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=0, img_size=img_size).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    return model, x


def probe_fn(model, x, kernel: str, compile_: bool):
    from mimlab.probe.api import ProbeConfig, probe

    cfg = ProbeConfig(batch_size=x.shape[0], bootstrap=200, cka=True, kernel=kernel, compile=compile_)

    def run():
        return probe({"m": model}, x, cfg)
    return run


def has_c_kernel() -> bool:
    try:
        from mimlab.probe.backends import cpu_kernel
    except ImportError:         # a checkout without the C kernel
        return False
    return cpu_kernel.is_available()


def peaked_logits(b: int, H: int, nq: int, N: int, seed: int = 0):
    """Rows with top probability 0.5-0.99 and logit spreads 100-200 (float32), like trained attention."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, H, nq, N, generator=g, dtype=torch.float64)
    spread = 100 + 100 * torch.rand(b, H, nq, 1, generator=g, dtype=torch.float64)
    s = (base - base.amax(-1, keepdim=True)) / (base.amax(-1, keepdim=True) - base.amin(-1, keepdim=True)) * spread
    top = torch.randint(0, N, (b, H, nq), generator=g)
    # the runner-up keys: a few logits within ~0-4 of the top, so the top probability lands in 0.5-0.99
    near = torch.rand(b, H, nq, 4, generator=g, dtype=torch.float64) * 4.0 + 0.5
    idx = torch.randint(0, N, (b, H, nq, 4), generator=g)
    s.scatter_(-1, idx, -near)
    s.scatter_(-1, top[..., None], torch.zeros(b, H, nq, 1, dtype=torch.float64))
    return s


def stats_error(kind: str, logits, num_prefix: int, dist) -> float:
    """Largest relative error of the per-image statistics of one path vs the float64 torch definition."""
    import torch

    from mimlab.probe.attention_stats import chunk_sums_tensors, finalize_image_stats

    def values(s):
        v = finalize_image_stats(s, logits.shape[2], float(dist.mean()))
        return torch.stack([v[k] for k in sorted(v)])

    ref = values(chunk_sums_tensors(logits.to(torch.float64), dist, num_prefix, 1e-8, True))
    x = logits.to(torch.float32)
    if kind == "torch":
        got = values(chunk_sums_tensors(x, dist, num_prefix, 1e-8, True))
    elif kind == "compiled":
        fn = torch.compile(chunk_sums_tensors, dynamic=False)
        got = values(fn(x, dist, num_prefix, 1e-8, True))
    else:
        from mimlab.probe.backends.cpu_kernel import logits_sums

        got = values(logits_sums(x, dist, num_prefix, 1e-8, True))
    return float(((got - ref).abs() / ref.abs().clamp_min(1e-12)).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--methods", default="forward,probe_torch,probe_compiled,probe_c")
    p.add_argument("--json", help="also write the raw times here")
    args = p.parse_args()

    import torch

    torch.set_grad_enabled(False)
    model, x = build(args.model, args.img_size, args.batch_size)
    methods = [m for m in args.methods.split(",") if m != "probe_c" or has_c_kernel()]
    fns = {"forward": lambda: model.forward_features(x)}
    if "probe_torch" in methods:
        fns["probe_torch"] = probe_fn(model, x, "torch", False)
    if "probe_compiled" in methods:
        fns["probe_compiled"] = probe_fn(model, x, "torch", True)
    if "probe_c" in methods:
        fns["probe_c"] = probe_fn(model, x, "cpu", False)
    warm = {}
    for m in methods:                                   # first call: compiles (C build, torch.compile)
        t = time.perf_counter()
        fns[m]()
        warm[m] = time.perf_counter() - t
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            t = time.perf_counter()
            fns[m]()
            times[m].append(time.perf_counter() - t)
    print(f"{args.model} @ {args.img_size}px, batch {args.batch_size}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'method':16s} {'first call s':>12s} {'median s':>9s} {'min s':>7s} {'x forward (median of rounds)':>30s}")
    for m in methods:
        ratios = [t / f for t, f in zip(times[m], times["forward"])]
        print(f"{m:16s} {warm[m]:12.2f} {statistics.median(times[m]):9.3f} {min(times[m]):7.3f} "
              f"{statistics.median(ratios):30.3f}")

    from mimlab.models.layout import inspect_layout

    lay = inspect_layout(model)
    dist = lay.distance_matrix_px()
    errs = {}
    for kind in [k for k in ("torch", "compiled", "c") if f"probe_{k}" in methods or k == "torch"]:
        errs[kind] = stats_error(kind, peaked_logits(2, 6, 32, lay.num_tokens), lay.num_prefix_tokens,
                                 dist[:32])
    print("max relative error vs float64 on peaked rows (top p 0.5-0.99, spreads 100-200): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "first_call_s": warm, "times": times, "peaked_rel_err": errs}, f,
                      indent=1)


if __name__ == "__main__":
    sys.exit(main())
