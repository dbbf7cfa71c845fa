"""`mimlab reproduce --preset {quick,cpu,gpu} --out DIR` or `mimlab reproduce --config FILE --out DIR`."""
from __future__ import annotations

import argparse

from mimlab.cli.common import add_threads_argument, threads_for
from mimlab.report.options import add_figure_arguments


def _epilog() -> str:
    from mimlab.reproduce.presets import StudyConfig

    keys = "\n".join(f"  {k:<22} {v}" for k, v in StudyConfig.HELP.items())
    examples = ("examples:\n"
                "  mimlab reproduce --preset quick --out runs/demo\n"
                "  mimlab reproduce --preset cpu --print-config > study.yaml\n"
                "  mimlab reproduce --config study.yaml --out runs/mine --list-stages\n"
                "  mimlab reproduce --config study.yaml --out runs/mine\n\n")
    return (examples + "study config keys (a --config file sets any of them; values per preset: docs/reproduce.md, or "
            "--print-config):\n" + keys)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _epilog()
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved study config as YAML (edit it and pass it back with --config) and exit")
    p.add_argument("--preset", default=None, choices=["quick", "cpu", "gpu"],
                   help="quick: minutes on a CPU (default); cpu: about 40 minutes on 2 cores; gpu: one GPU")
    p.add_argument("--config", default=None, help="a YAML or TOML file: optional 'preset' plus overrides")
    p.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun a stage (and what depends on it) even if cached, e.g. probe or transfer; repeatable")
    p.add_argument("--device", default=None, help="override the preset's device (auto, cpu, cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_figure_arguments(p, study=True)
    add_threads_argument(p)
    p.add_argument("--list-stages", action="store_true",
                   help="check the study config and print the stage graph (name, depends on, cached) without running")
    p.add_argument("--stage", action="append", default=[], metavar="NAME",
                   help="run only this stage (its dependencies must be finished), e.g. from a SLURM array task; "
                        "repeatable. A plain `mimlab reproduce` afterwards writes the report")
    p.add_argument("--launcher", choices=["local", "submitit"], default="local",
                   help="submitit: submit every stage as a job with submitit, dependencies as job dependencies "
                        "(pip install submitit; SLURM, or submitit's local executor with --submitit-local)")
    p.add_argument("--submitit-folder", default=None, metavar="DIR",
                   help="submitit's log folder (default OUT/submitit)")
    p.add_argument("--submitit-local", action="store_true", help="use submitit's local executor (no SLURM)")


def run(args: argparse.Namespace) -> int:
    from mimlab.errors import MimlabError
    from mimlab.reproduce.presets import build_config, load_config_file

    if args.preset and args.config:
        raise MimlabError("give --preset or --config (which may name a preset), not both")
    cfg = load_config_file(args.config) if args.config else build_config(args.preset or "quick")
    import dataclasses

    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if args.figure_format is not None:
        cfg = dataclasses.replace(cfg, figure_format=args.figure_format)
    if args.figure_dpi is not None:
        cfg = dataclasses.replace(cfg, figure_dpi=args.figure_dpi)
    if args.print_config:
        from mimlab.reproduce.presets import config_yaml

        print(config_yaml(cfg), end="")
        return 0
    with threads_for(args.threads):
        return _run(args, cfg)


def _run(args: argparse.Namespace, cfg) -> int:
    import time

    from mimlab.reproduce.pipeline import Study

    study = Study(cfg, args.out, force=tuple(args.force), progress=not args.quiet)   # checks every stage's config
    if args.list_stages:
        rows = study.stage_table()
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            deps = ", ".join(r["deps"]) or "-"
            print(f"{r['name']:<{width}}  {'cached' if r['cached'] else 'to run':<6}  after: {deps}")
        print(f"{sum(r['cached'] for r in rows)} of {len(rows)} stages cached in {args.out}")
        return 0
    if args.launcher == "submitit":
        from mimlab.reproduce.launch import submit_study

        jobs = submit_study(study, args, folder=args.submitit_folder, local=args.submitit_local)
        print(f"submitted {len(jobs)} stage jobs; when they are done, `mimlab reproduce` with the same arguments "
              "writes the report")
        return 0
    if args.stage:
        for name in args.stage:
            rec = study.run_stage(name)
            print(f"{name}: {'cached' if rec.skipped else f'done in {rec.seconds:.0f} s'}")
        return 0
    t0 = time.perf_counter()
    summary = study.run()
    print(f"\n{summary['scale']}")
    for cid, c in summary["claims"].items():
        note = "  (a model was not trained enough: see the report)" if c.get("reason") else ""
        print(f"  {cid} {c['verdict']:>14}  {c['text']}{note}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    print(f"report:  {summary['paths']['report']}")
    print(f"summary: {summary['paths']['summary']}")
    return 0
