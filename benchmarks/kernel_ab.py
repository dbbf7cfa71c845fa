"""A/B of two versions of the CPU statistics kernel (`mimlab/probe/backends/cpu_kernel.{py,c}`; before the redesign
`mimlab/probe/cpu_stats.py`), alternated layer by layer.

On a machine whose speed drifts (the VM this was written on changes by up to 2x from minute to minute), timing
whole runs of two versions one after the other measures the drift. Here both versions are loaded into one
process as separate modules (each builds its own library), and for every layer of a ViT-S/16 batch the two run
back to back, in an order that flips every pair. The median of the per-pair time ratios is stable to about 1%
(an A/A run reads 1.00 +- 0.01), where whole-batch rounds swing by 30%.

    python benchmarks/kernel_ab.py --old ac51769 --new HEAD            # two git revisions
    python benchmarks/kernel_ab.py --old HEAD --new src/mimlab/probe/backends/cpu_kernel.py --rounds 15   # work tree

Each version is used through its own q.k entry (`qk_sums`, or `cpu_qk_sums_tensors` in the old layout; so the Python
wrapper is part of what is compared);
the inputs are the q and k of all 12 layers of ViT-S/16 at 224 px for 32 random images, with the qkv weights
scaled by 4 for trained-like (non-uniform) attention. Also prints the largest relative difference of the results.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULE = "src/mimlab/probe/backends/cpu_kernel.py"
OLD_MODULE = "src/mimlab/probe/cpu_stats.py"           # the layout before the redesign (C source in a string)


def _git_show(rev: str, path: str) -> str | None:
    r = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def load_version(spec: str, name: str, tmp: Path):
    """A module from a file path (cpu_kernel.py beside its cpu_kernel.c, or an old cpu_stats.py), or from a git
    revision (either layout)."""
    path = Path(spec)
    if not path.is_file():
        d = tmp / name
        d.mkdir()
        text = _git_show(spec, MODULE)
        if text is not None:
            path = d / "cpu_kernel.py"
            path.write_text(text)
            (d / "cpu_kernel.c").write_text(_git_show(spec, MODULE[:-3] + ".c"))
        else:
            path = d / "cpu_stats.py"
            path.write_text(_git_show(spec, OLD_MODULE))
    mspec = importlib.util.spec_from_file_location(f"cpu_kernel_{name}", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    if not mod.is_available():
        sys.exit(f"{spec}: the kernel does not build here ({mod.unavailable_reason()})")
    return mod


def vit_small_qk(batch: int):
    """[(q, k, scale)] of every block of ViT-S/16 at 224 px, as timm hands them to SDPA (views of qkv)."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=0).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = []

    def hook(m, args, _):
        a = args[0]
        B, N, C = a.shape
        qkv = m.qkv(a).reshape(B, N, 3, m.num_heads, C // m.num_heads).permute(2, 0, 3, 1, 4)
        out.append((qkv[0], qkv[1], m.scale))

    handles = [b.attn.register_forward_hook(hook) for b in model.blocks]
    with torch.no_grad():
        model.forward_features(x)
    for h in handles:
        h.remove()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="git revision, or path of cpu_kernel.py (or an old cpu_stats.py)")
    p.add_argument("--new", required=True, help="git revision, or path of cpu_kernel.py (or an old cpu_stats.py)")
    p.add_argument("--rounds", type=int, default=9, help="passes over the 12 layers (pairs = 12 x rounds)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:                      # each module compiles its library on load
        old, new = load_version(args.old, "old", Path(tmp)), load_version(args.new, "new", Path(tmp))
        old.is_available(), new.is_available()
    qk = vit_small_qk(args.batch_size)
    g = torch.arange(14.0) * 16
    pos = torch.cartesian_prod(g, g)
    dist = torch.cdist(pos, pos)                                     # patch-centre distances in px, 196 x 196

    names = ("dist", "entropy", "negent", "prefix", "cross", "js", "colsum")

    def call(mod, q, k, s):
        if hasattr(mod, "qk_sums"):
            out = mod.qk_sums(q, k, None, s, 1, dist, 1e-8, True, True)
            return [getattr(out, n) for n in names]
        return list(mod.cpu_qk_sums_tensors(q, k, None, s, 1, dist, 1e-8, True, True)[:7])

    diff = 0.0
    for q, k, s in qk:                                               # warm-up, and how far the results differ
        a, b = call(old, q, k, s), call(new, q, k, s)
        for x, y in zip(a, b):
            diff = max(diff, float(((x - y).abs() / (y.abs() + 1e-6)).max()))
    ratios, total = [], {"old": 0.0, "new": 0.0}
    for r in range(args.rounds):
        for li, (q, k, s) in enumerate(qk):
            order = [("old", old), ("new", new)] if (r + li) % 2 == 0 else [("new", new), ("old", old)]
            t = {}
            for name, mod in order:
                t0 = time.perf_counter()
                call(mod, q, k, s)
                t[name] = time.perf_counter() - t0
                total[name] += t[name]
            ratios.append(t["new"] / t["old"])
    rs = sorted(ratios)
    print(f"new / old ({args.new} vs {args.old}): median pair ratio {statistics.median(rs):.3f} "
          f"(IQR {rs[len(rs) // 4]:.3f}-{rs[3 * len(rs) // 4]:.3f}, {len(rs)} pairs); "
          f"per batch of {args.batch_size}, 12 layers: old {total['old'] / args.rounds * 1e3:.0f} ms, "
          f"new {total['new'] / args.rounds * 1e3:.0f} ms; max relative difference of the results {diff:.1e}")


if __name__ == "__main__":
    main()
