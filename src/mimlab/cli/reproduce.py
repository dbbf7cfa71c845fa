"""`mimlab reproduce --preset {quick,cpu,gpu} --out DIR` or `mimlab reproduce --config FILE --out DIR`."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, choices=["quick", "cpu", "gpu"],
                   help="quick: minutes on a CPU (default); cpu: about an hour on 2 cores; gpu: one GPU")
    p.add_argument("--config", default=None, help="a YAML or TOML file: optional 'preset' plus overrides")
    p.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun a stage (and what depends on it) even if cached, e.g. probe or transfer; repeatable")
    p.add_argument("--device", default=None, help="override the preset's device (auto, cpu, cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import time

    from mimlab.errors import MimlabError
    from mimlab.reproduce.pipeline import Study
    from mimlab.reproduce.presets import build_config, load_config_file

    if args.preset and args.config:
        raise MimlabError("give --preset or --config (which may name a preset), not both")
    cfg = load_config_file(args.config) if args.config else build_config(args.preset or "quick")
    if args.device:
        import dataclasses

        cfg = dataclasses.replace(cfg, device=args.device)
    t0 = time.perf_counter()
    summary = Study(cfg, args.out, force=tuple(args.force), progress=not args.quiet).run()
    print(f"\n{summary['scale']}")
    for cid, c in summary["claims"].items():
        note = "  (a model was not trained enough: see the report)" if c.get("reason") else ""
        print(f"  {cid} {c['verdict']:>14}  {c['text']}{note}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    print(f"report:  {summary['paths']['report']}")
    print(f"summary: {summary['paths']['summary']}")
    return 0
