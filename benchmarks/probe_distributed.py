"""The probe in one process vs N gloo processes (torchrun) on the CPU: wall time (median of repeats, each a fresh
process, model build and data included) and the largest relative difference of every metric and of CKA.

    python benchmarks/probe_distributed.py --nproc 2 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def walk(a, b, worst, path=""):
    if isinstance(a, dict):
        for k in a:
            if k not in ("provenance", "seconds", "images_per_second", "config") and k in b:
                walk(a[k], b[k], worst, f"{path}/{k}")
    elif isinstance(a, list):
        for x, y in zip(a, b):
            walk(x, y, worst, path)
    elif isinstance(a, float):
        key = "cka" if path.startswith("/cka") else path.rsplit("/", 1)[-1]
        worst[key] = max(worst.get(key, 0.0), abs(a - b) / max(abs(a), 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=256)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    kw = "img_size=64,patch_size=8,depth=6,embed_dim=192,num_heads=3"
    argv = ["probe", "a=vit_tiny_patch16_224", "b=vit_tiny_patch16_224", "--model-kwargs", kw, "--data", "builtin",
            "--images", str(a.images), "--batch-size", "32", "--bootstrap", "200", "--workers", "0", "--quiet",
            "--no-report"]
    env = {**os.environ}
    one, many = [], []
    for r in range(a.repeats):
        for label, times in (("one", one), ("many", many)):
            out = tmp / f"{label}{r}"
            if label == "one":
                cmd = [sys.executable, "-m", "mimlab", *argv, "--out", str(out)]
                e = {**env, "OMP_NUM_THREADS": str(a.nproc)}
            else:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
                       "--master_port", str(port), "-m", "mimlab", *argv, "--out", str(out)]
                e = {**env, "OMP_NUM_THREADS": "1"}
            t0 = time.perf_counter()
            subprocess.run(cmd, env=e, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    worst: dict[str, float] = {}
    walk(json.loads((tmp / "one0" / "metrics.json").read_text()), json.loads((tmp / "many0" / "metrics.json")
                                                                              .read_text()), worst)
    t1, tn = statistics.median(one), statistics.median(many)
    print(f"1 process ({a.nproc} threads): {t1:.1f} s; {a.nproc} processes (1 thread each): {tn:.1f} s; "
          f"ratio {t1 / tn:.2f}x (medians of {a.repeats}, {a.images} images, 2 ViT-Ti models at 64 px)")
    print("largest relative difference:", ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items(),
                                                                                     key=lambda kv: -kv[1])[:8]))


if __name__ == "__main__":
    main()
