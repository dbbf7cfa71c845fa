"""Two parts of the CPU probe against their obvious alternatives, each pair alternated in one process.

- gram:  the float64 CKA Gram of one batch's block outputs (32 x 197 x 384 for ViT-S/16): the C kernel
         (`feature_gram(x, cpu_kernel.feature_gram_parts)`) vs torch (`feature_gram(x)`: float32 and float64
         copies, then dgemm);
- team:  the whole probe of one batch with the C kernel's batch entries on an OpenMP team (torch's runtime) vs the
         same entries on a pool of Python threads (as a build without OpenMP runs them), and the plain forward pass,
         the three rotated every round.
Prints medians of per-round ratios (the VM this was written on changes speed by up to 2x from minute to minute).

    python benchmarks/probe_cpu_parts.py [--rounds 15] [--parts gram,team]
"""
from __future__ import annotations

import argparse
import statistics
import time


def bench_gram(rounds: int) -> None:
    import torch

    from mimlab.probe.backends import cpu_kernel
    from mimlab.probe.backends.torch_stats import feature_gram

    x = torch.randn(32, 197 * 384, generator=torch.Generator().manual_seed(0)) + 5.0
    c = cpu_kernel.feature_gram_parts
    feature_gram(x, c)
    feature_gram(x)
    tc, tt = [], []
    for r in range(rounds):
        for use_c in ((True, False) if r % 2 == 0 else (False, True)):
            t = time.perf_counter()
            feature_gram(x, c if use_c else None)
            (tc if use_c else tt).append(time.perf_counter() - t)
    ratios = sorted(a / b for a, b in zip(tc, tt))
    print(f"gram (32 x 75,648 float32 -> 32 x 32 float64), {rounds} rounds: C {statistics.median(tc) * 1e3:.2f} ms, "
          f"torch {statistics.median(tt) * 1e3:.2f} ms (medians); "
          f"C / torch median ratio {statistics.median(ratios):.3f}")


def bench_team(rounds: int) -> None:
    import timm
    import torch

    from mimlab.probe.api import ProbeConfig, ProbeModel, probe
    from mimlab.probe.backends import cpu_kernel

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=0).eval()
    with torch.no_grad():                     # trained-like attention (random init is nearly uniform)
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    lib = cpu_kernel._lib()
    if lib is None or not lib.has_openmp():
        print(f"team: the C kernel is unavailable or built without OpenMP here ({cpu_kernel.unavailable_reason()})")
        return

    class Pool:                               # the same library, as a build without OpenMP reports itself
        def __getattr__(self, name):
            return (lambda: 0) if name == "has_openmp" else getattr(lib, name)

    pool_lib = Pool()

    def forward():
        with torch.no_grad():
            model.forward_features(x)

    def run_probe(team: bool):
        cpu_kernel._LIB = lib if team else pool_lib
        try:
            probe([ProbeModel("m", model)], [x], ProbeConfig(batch_size=32), num_images=32)
        finally:
            cpu_kernel._LIB = lib

    methods = {"forward": forward, "team": lambda: run_probe(True), "pool": lambda: run_probe(False)}
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            t = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t)
    med = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))   # noqa: E731
    print(f"probe of one batch (ViT-S/16, 32 images), {rounds} rotated rounds: "
          f"team / forward {med('team', 'forward'):.3f}, "
          f"pool / forward {med('pool', 'forward'):.3f}, team / pool {med('team', 'pool'):.3f} (medians of per-round "
          f"ratios); forward median {statistics.median(times['forward']):.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--parts", default="gram,team")
    args = p.parse_args()
    parts = args.parts.split(",")
    if "gram" in parts:
        bench_gram(args.rounds)
    if "team" in parts:
        bench_team(args.rounds)


if __name__ == "__main__":
    main()
