"""The study as a sequence of cached stages: data -> pretrain -> probe -> transfer -> report.

Stage names (each a folder under `OUT/stages/`): `data/<task>`, `pretrain/<method>` (and `pretrain/random`, the
random-init control built from the same seed), `probe`, `baseline/simmim` (the mean-colour predictor's SimMIM
loss), `transfer/<model>/<task>/s<seed>` and `transfer/<model>-drop<K>/<task>/s<seed>` (the layer ablation).
Each stage runs one verb from its config object (`PretrainConfig`, `ProbeConfig`, `TransferConfig`), which is also
what keys its cache. The report is rebuilt on every run from the stage outputs (it is cheap).
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from mimlab.errors import ConfigError, MimlabError
from mimlab.models.factory import parse_model_kwargs
from mimlab.reproduce.presets import StudyConfig
from mimlab.reproduce.stages import Stage, StageRecord, StageRunner


def _device(cfg: StudyConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _interrupted(stage_dir: Path) -> bool:
    """A killed earlier attempt left outputs in this stage folder: resume it (from its checkpoint, or from step 0
    over the partial logs of an attempt killed before its first checkpoint, which a fresh run would refuse)."""
    from mimlab.reproduce.stages import PENDING
    from mimlab.utils.lock import LOCK_NAME

    return any(p.name not in (PENDING, LOCK_NAME) for p in stage_dir.iterdir())


def _tail_mean(losses: list[float], frac: float = 0.1) -> float | None:
    if not losses:
        return None
    k = max(1, int(len(losses) * frac))
    return float(sum(losses[-k:]) / k)


class Study:
    def __init__(self, cfg: StudyConfig, out: str | Path, force: tuple[str, ...] = (), progress: bool = True,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.runner = StageRunner(self.out, force=force, log=self.log)
        self.kwargs = parse_model_kwargs(cfg.model_kwargs)
        self.device = _device(cfg)
        self.plan = self.stages()             # every stage's config, checked before anything runs

    # -------------------------------------------------------------------------------------------- the stages
    def data_stage(self, task: str) -> Stage:
        spec = self.cfg.transfer_data[task]
        name = f"data/{task}"
        if isinstance(spec, str):           # a user dataset in its real format: nothing to build
            path = Path(spec)
            if not path.exists():
                raise ConfigError(f"transfer_data.{task}", f"{path} does not exist")
            conf = {"path": str(path.resolve())}
            return Stage(name, (), conf, lambda d: dict(conf))

        def build(d: Path) -> dict[str, Any]:
            from mimlab.data.downstream import generate

            params = {k: v for k, v in spec.items() if k != "kind"}
            generate(spec["kind"], d / "data", seed=0, overwrite=True, **params)
            return {"path": str(d / "data")}

        return Stage(name, (), dict(spec), build)

    def data_path(self, task: str) -> str:
        """Where a task's data is once its stage has run (known before it runs)."""
        spec = self.cfg.transfer_data[task]
        return str(Path(spec).resolve()) if isinstance(spec, str) else str(self.runner.stage_dir(f"data/{task}")
                                                                           / "data")

    def pretrain_config(self, method: str, out: Path):
        from mimlab.pretrain.api import PretrainConfig

        cfg = self.cfg
        return PretrainConfig(method=method, model=cfg.arch, data=cfg.pretrain_data, out=out, model_kwargs=self.kwargs,
                              steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch_size,
                              seed=cfg.init_seed, device=self.device, precision=cfg.precision,
                              mask_patch_size=cfg.mask_patch_size, progress=self.progress,
                              crop_scale=tuple(cfg.pretrain_crop_scale) if cfg.pretrain_crop_scale is not None
                              else None)

    def pretrain_stage(self, method: str) -> Stage:
        cfg = self.cfg
        name = f"pretrain/{method}"
        if method in cfg.checkpoints:
            path = Path(cfg.checkpoints[method])
            if not path.is_file():
                raise ConfigError(f"checkpoints.{method}", f"{path} does not exist")
            from mimlab.utils.io import sha256_file

            conf = {"checkpoint": str(path.resolve()), "sha256": sha256_file(path)}
            return Stage(name, (), conf, lambda d: {"model": str(path.resolve()), "imported": True})
        pcfg = self.pretrain_config(method, self.runner.stage_dir(name))
        from mimlab.pretrain.api import check_config

        check_config(pcfg)

        def build(d: Path) -> dict[str, Any]:
            from mimlab.pretrain.api import pretrain

            from mimlab.engine.logger import read_loss_log

            res = pretrain(dataclasses.replace(pcfg, resume=_interrupted(d)))
            run = res.run or {}
            log = read_loss_log(res.out / "metrics.csv")   # the whole run: res.losses has only this attempt's
            losses = log.losses
            rate = res.img_per_s
            if rate is None and log.img_per_s:             # an attempt that trained nothing: the logged intervals'
                rate = float(statistics.median(log.img_per_s))
            return {"model": str(res.model_path), "steps": res.step, "final_loss": _tail_mean(losses),
                    "img_per_s": rate, "img_per_s_with_warmup": res.train.img_per_s_with_warmup,
                    "mask": (run.get("method_config") or {}).get("mask"),
                    "losses_head": losses[:10]}

        return Stage(name, (), pcfg, build)

    def model_path(self, label: str) -> str:
        """Where a model's weights are once its stage has run (known before it runs)."""
        if label in self.cfg.checkpoints:
            return str(Path(self.cfg.checkpoints[label]).resolve())
        return str(self.runner.stage_dir(f"pretrain/{label}") / "model.safetensors")

    def random_stage(self) -> Stage:
        cfg = self.cfg
        conf = {"arch": cfg.arch, "model_kwargs": cfg.model_kwargs, "seed": cfg.init_seed}   # create_model's inputs

        def build(d: Path) -> dict[str, Any]:
            from mimlab.engine import seed_everything
            from mimlab.models.checkpoints import save_state_dict
            from mimlab.models.factory import create_model

            seed_everything(cfg.init_seed)
            model, _ = create_model(cfg.arch, self.kwargs, num_classes=0)
            save_state_dict(model, d / "model.safetensors")
            return {"model": str(d / "model.safetensors")}

        return Stage("pretrain/random", (), conf, build)

    def probe_config(self, models: dict[str, str], out: Path):
        from mimlab.probe.api import ProbeConfig

        cfg = self.cfg
        return ProbeConfig(models=tuple(f"{k}={cfg.arch}@{v}" for k, v in models.items()),
                           model_kwargs=(cfg.model_kwargs,) if cfg.model_kwargs else (), data=cfg.probe_data,
                           images=cfg.probe_images, batch_size=cfg.probe_batch_size, out=str(out), device=self.device,
                           seed=0, workers=0, progress=self.progress, report=False, bootstrap=cfg.bootstrap)

    def probe_stage(self, labels: list[str]) -> Stage:
        pcfg = self.probe_config({k: self.model_path(k) for k in labels}, self.runner.stage_dir("probe"))

        def build(d: Path) -> dict[str, Any]:
            from mimlab.probe.run import run_probe

            run_probe(pcfg)
            return {"metrics": str(d / "metrics.json"), "replicates": str(d / "replicates.npz")}

        return Stage("probe", tuple(f"pretrain/{k}" for k in labels), pcfg, build)

    def simmim_baseline_stage(self) -> Stage:
        """SimMIM's loss for the best trivial predictor (each image's visible mean colour), on held-out images; the
        mask geometry is the SimMIM run's (its stage is a dependency, so its key covers it)."""
        conf = {"data": self.cfg.pretrain_data, "images": 256}

        def build(d: Path) -> dict[str, Any]:
            from mimlab.pretrain.simmim import mean_colour_baseline

            mask = self.runner.records["pretrain/simmim"].outputs.get("mask")
            return {"mean_colour_l1": mean_colour_baseline(mask=mask, **conf)}

        return Stage("baseline/simmim", ("pretrain/simmim",), conf, build)

    def transfer_config(self, label: str, model_path: str, task: str, seed: int, data: str, drop: int, out: Path):
        from mimlab.transfer.api import TransferConfig

        cfg = self.cfg
        return TransferConfig(task=task, backbone=f"{label}={cfg.arch}@{model_path}", data=data, out=out,
                              model_kwargs=self.kwargs, steps=cfg.transfer_steps.get(task),
                              batch_size=cfg.transfer_batch_size, seed=seed, device=self.device,
                              drop_last_blocks=drop, progress=self.progress, precision=cfg.precision)

    def transfer_stage(self, label: str, task: str, seed: int, drop: int = 0) -> Stage:
        name = f"transfer/{label}{f'-drop{drop}' if drop else ''}/{task}/s{seed}"
        tcfg = self.transfer_config(label, self.model_path(label), task, seed, self.data_path(task), drop,
                                    self.runner.stage_dir(name))

        def build(d: Path) -> dict[str, Any]:
            from mimlab.transfer.api import run_transfer

            rep = run_transfer(dataclasses.replace(tcfg, resume=_interrupted(d)))
            return {"metrics": rep["metrics"], "baseline": rep["baseline"]}

        return Stage(name, (f"data/{task}", f"pretrain/{label}"), tcfg, build)

    def stages(self) -> dict[str, Stage]:
        """Every stage of the study, in an order that respects their dependencies, each with its config built and
        checked: a bad study config fails here, before any stage runs."""
        cfg = self.cfg
        self.figure_options()                        # checked with the rest, though only the report uses them
        if "simmim" not in cfg.methods or "supervised" not in cfg.methods:
            raise ConfigError("methods", "must hold both 'simmim' and 'supervised': the study compares them")
        labels = [*cfg.methods, "random"]
        for label in cfg.transfer_models:
            if label not in labels:
                raise ConfigError("transfer_models", f"'{label}' is not one of the models {sorted(labels)}")
        out: list[Stage] = [self.data_stage(t) for t in cfg.tasks]
        out += [self.pretrain_stage(m) for m in cfg.methods] + [self.random_stage()]
        out.append(self.probe_stage(labels))
        if "simmim" not in cfg.checkpoints:
            out.append(self.simmim_baseline_stage())
        out += [self.transfer_stage(label, task, seed) for label in cfg.transfer_models for task in cfg.tasks
                for seed in cfg.seeds]
        if cfg.ablation_blocks:
            depth = self.model_depth()
            if depth is not None and cfg.ablation_blocks >= depth:
                raise ConfigError("ablation_blocks", f"{cfg.ablation_blocks} would drop every block of a {depth}-block "
                                                     f"{cfg.arch}: use fewer than {depth}")
            out += [self.transfer_stage("supervised", task, seed, drop=cfg.ablation_blocks)
                    for task in cfg.ablation_tasks if task in cfg.tasks for seed in cfg.seeds]
        return {st.name: st for st in out}

    def figure_options(self):
        from mimlab.report.options import FigureOptions

        return FigureOptions(tuple(self.cfg.figure_format), self.cfg.figure_dpi)

    def model_depth(self) -> int | None:
        """The number of blocks of the study's architecture (built on the meta device: no weights)."""
        import torch

        from mimlab.models.factory import create_model

        try:
            with torch.device("meta"):
                model, _ = create_model(self.cfg.arch, self.kwargs, num_classes=0)
        except Exception:           # an architecture that cannot be built so is checked when its stage runs
            return None
        blocks = getattr(model, "blocks", None)
        if blocks is None and hasattr(model, "layers"):
            return sum(len(getattr(layer, "blocks", [])) for layer in model.layers) or None
        return len(blocks) if blocks is not None else None

    # ---------------------------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        """Run (or resume) the study; `OUT` is locked for the run's lifetime, so a second `mimlab reproduce`
        into the same directory fails at once instead of corrupting this one."""
        from mimlab.utils.io import remove_stale_temps
        from mimlab.utils.lock import run_lock

        with run_lock(self.out, verb="mimlab reproduce"):
            remove_stale_temps(self.out)          # a killed run's half-written report files (stages: per stage,
            for sub in self.out.iterdir():        # under their own locks, as separate processes may run them)
                if sub.is_dir() and sub.name not in ("stages", "locks"):
                    remove_stale_temps(sub, recursive=True)
            return self._run()

    def _run(self) -> dict[str, Any]:
        from mimlab.reproduce.progress import StudyClock, stage_work

        self.log(self.cfg.scale_line())
        stages = list(self.plan.values())
        cached = {st.name for st in stages if self.finished(st.name) is not None}
        work = {st.name: stage_work(st.config) for st in stages}
        clock = StudyClock(len(stages))
        for k, st in enumerate(stages, 1):
            todo = [(s.name, work[s.name]) for s in stages[k - 1:] if s.name not in cached]
            rec = self.runner.run(st.name, st.config, st.build, deps=st.deps, note=clock.note(k, todo))
            if not rec.skipped:
                clock.ran(st.name, rec.seconds, work[st.name])
        return self.report()

    def report(self) -> dict[str, Any]:
        """The study's summary and report from the finished stages' records."""
        from mimlab.report.study import write_study_report
        from mimlab.reproduce.summary import build_summary

        cfg, rec = self.cfg, self.runner.records
        pre = {m: rec[f"pretrain/{m}"].outputs for m in [*cfg.methods, "random"]}
        baseline = rec["baseline/simmim"].outputs if "baseline/simmim" in rec else {}
        downstream: dict[str, dict[str, Any]] = {}
        for name in self.plan:
            if name.startswith("transfer/"):
                _, label, task, seed = name.split("/")
                downstream.setdefault(label, {}).setdefault(task, []).append(
                    {**rec[name].outputs, "seed": int(seed.removeprefix("s"))})
        probe = rec["probe"].outputs
        summary = build_summary(cfg, pre, probe, baseline, downstream, rec)
        paths = write_study_report(summary, probe, self.out, self.figure_options())
        summary["paths"] = {k: str(v) for k, v in paths.items()}
        return summary

    # -------------------------------------------------------------------------------------------- fan-out
    def stage_table(self) -> list[dict[str, Any]]:
        """Every stage: its name, what it depends on, and whether it is finished with its current config."""
        return [{"name": st.name, "deps": list(st.deps), "cached": self.finished(st.name) is not None}
                for st in self.plan.values()]

    def run_stage(self, name: str) -> StageRecord:
        """Run one stage whose dependencies are finished (a SLURM array task, a submitit job)."""
        if name not in self.plan:
            raise ConfigError("stage", f"'{name}' is not a stage of this study; `mimlab reproduce --list-stages` "
                                       "lists them")
        st = self.plan[name]
        for dep in st.deps:
            if self.finished(dep) is None:
                raise MimlabError(f"stage {name} needs {dep}, which is not finished: run it first (--stage {dep})")
        return self.runner.run(st.name, st.config, st.build, deps=st.deps)

    def finished(self, name: str) -> StageRecord | None:
        """The record of a finished stage (its dependencies finished too, with the keys they had), or None."""
        st = self.plan[name]
        if any(self.finished(dep) is None for dep in st.deps):
            return None
        return self.runner.lookup(st.name, st.config, st.deps)
