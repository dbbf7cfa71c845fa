"""`mimlab reproduce --launcher submitit`: every unfinished stage of the study as a submitit job.

On SLURM (submitit's AutoExecutor finds `srun`), all jobs are submitted at once and each waits for the jobs of its
dependencies (`--dependency=afterok:...`). With submitit's local executor (`--submitit-local`, or no SLURM), which
has no dependencies, the stages go in waves: a wave's jobs run at once, the next wave is submitted when they are
done. Each job runs `Study.run_stage(name)` in the shared study folder; the stage locks keep concurrent stages
apart, and a plain `mimlab reproduce` afterwards finds every stage cached and writes the report.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mimlab.errors import ConfigError, MimlabError


def run_stage_job(cfg: Any, out: str, name: str, threads: int | None = None) -> dict[str, Any]:
    """One stage, in a fresh process (what a submitit job runs), with `threads` torch threads if given."""
    from mimlab.reproduce.pipeline import Study

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    rec = Study(cfg, out, progress=False).run_stage(name)
    return {"name": name, "seconds": rec.seconds, "cached": rec.skipped}


def waves(study) -> list[list[str]]:
    """The unfinished stages in dependency levels (a stage's level is one more than its deepest unfinished
    dependency's)."""
    level: dict[str, int] = {}
    for name, st in study.plan.items():             # the plan is in dependency order
        if study.finished(name) is not None:
            continue
        level[name] = 1 + max((level[d] for d in st.deps if d in level), default=-1)
    out: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for name, lv in level.items():
        out[lv].append(name)
    return out


def submit_study(study, args: argparse.Namespace, folder: str | None = None, local: bool = False) -> list[Any]:
    try:
        import submitit
    except ImportError:
        raise ConfigError("launcher", "submitit needs its package: pip install submitit") from None
    if args.force:
        raise ConfigError("force", "cannot be combined with --launcher submitit: run the forced stages first")
    log_dir = Path(folder) if folder else Path(args.out) / "submitit"
    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster="local" if local else None)
    executor.update_parameters(timeout_min=24 * 60, name="mimlab-stage")
    levels = waves(study)
    jobs: dict[str, Any] = {}
    if executor.cluster == "slurm":
        for wave in levels:
            for name in wave:
                after = [jobs[d].job_id for d in study.plan[name].deps if d in jobs]
                extra = {"dependency": "afterok:" + ":".join(after)} if after else {}
                executor.update_parameters(name=f"mimlab:{name}", slurm_additional_parameters=extra)
                jobs[name] = executor.submit(run_stage_job, study.cfg, str(study.out), name, args.threads)
        return list(jobs.values())
    for wave in levels:                               # local: no job dependencies, so wave after wave
        submitted = {name: executor.submit(run_stage_job, study.cfg, str(study.out), name, args.threads)
                     for name in wave}
        for name, job in submitted.items():
            try:
                job.result()
            except Exception as e:                    # submitit.FailedJobError: the stage's own error is in it
                raise MimlabError(f"stage {name} failed in its submitit job (logs in {log_dir}): "
                                  f"{str(e).strip().splitlines()[-1]}") from None
        jobs.update(submitted)
    return list(jobs.values())
