"""`mimlab demo`: the built-in end-to-end job that `make demo` runs (offline, CPU, a few minutes)."""
from __future__ import annotations

import argparse

SMALL = "img_size=32,patch_size=4,depth=6,embed_dim=128,num_heads=4"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--images", type=int, default=128, help="held-out built-in images to probe (default 128)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from mimlab.probe.api import ProbeConfig
    from mimlab.probe.run import ProbeRequest, run_probe, summary_lines

    print("mimlab demo: probing small built-in ViTs (6 blocks, width 128, 32 px, 8x8 patch grid) on built-in "
          "fractal-leaves images. Scale: tiny, CPU; not the paper's ViT-B/16 at 224 px.")
    req = ProbeRequest(models=["vit=vit_tiny_patch16_224", "deit_distilled=deit_tiny_distilled_patch16_224",
                               "beit=beit_base_patch16_224"],
                       model_kwargs=[SMALL, SMALL, SMALL + ",use_abs_pos_emb=False,use_rel_pos_bias=True,init_values=0.1"],
                       data="builtin", images=args.images, batch_size=32, out=args.out, seed=args.seed,
                       workers=0, config=ProbeConfig(seed=args.seed))
    result, paths = run_probe(req)
    print("\n".join(summary_lines(result)))
    print(f"report: {paths['report']}")
    return 0
