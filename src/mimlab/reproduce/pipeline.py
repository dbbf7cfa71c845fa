"""The study as a sequence of cached stages: data -> pretrain -> probe -> transfer -> report.

Stage names (each a folder under `OUT/stages/`): `data/<task>`, `pretrain/<method>` (and `pretrain/random`, the
random-init control built from the same seed), `probe`, `baseline/simmim` (the mean-colour predictor's SimMIM
loss), `transfer/<model>/<task>/s<seed>` and `transfer/<model>-drop<K>/<task>/s<seed>` (the layer ablation).
Each stage runs one verb from its config object (`PretrainConfig`, `ProbeConfig`, `TransferConfig`), which is also
what keys its cache. The report is rebuilt on every run from the stage outputs (it is cheap).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

from mimlab.errors import ConfigError
from mimlab.models.factory import parse_model_kwargs
from mimlab.reproduce.presets import StudyConfig
from mimlab.reproduce.stages import StageRunner


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

    # ------------------------------------------------------------------------------------------------- data
    def data_stage(self, task: str) -> str:
        spec = self.cfg.transfer_data[task]
        if isinstance(spec, str):           # a user dataset in its real format: nothing to build
            path = Path(spec)
            if not path.exists():
                raise ConfigError(f"transfer_data.{task}", f"{path} does not exist")
            rec = self.runner.run(f"data/{task}", {"path": str(path.resolve())},
                                  lambda d: {"path": str(path.resolve())})
            return rec.outputs["path"]

        def build(d: Path) -> dict[str, Any]:
            from mimlab.data.downstream import generate

            params = {k: v for k, v in spec.items() if k != "kind"}
            generate(spec["kind"], d / "data", seed=0, overwrite=True, **params)
            return {"path": str(d / "data")}

        return self.runner.run(f"data/{task}", dict(spec), build).outputs["path"]

    # --------------------------------------------------------------------------------------------- pretrain
    def pretrain_config(self, method: str, out: Path):
        from mimlab.pretrain.api import PretrainConfig

        cfg = self.cfg
        return PretrainConfig(method=method, model=cfg.arch, data=cfg.pretrain_data, out=out, model_kwargs=self.kwargs,
                              steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch_size,
                              seed=cfg.init_seed, device=self.device, precision=cfg.precision,
                              mask_patch_size=cfg.mask_patch_size, progress=self.progress,
                              crop_scale=tuple(cfg.pretrain_crop_scale) if cfg.pretrain_crop_scale is not None
                              else None)

    def pretrain_stage(self, method: str) -> dict[str, Any]:
        cfg = self.cfg
        name = f"pretrain/{method}"
        if method in cfg.checkpoints:
            path = Path(cfg.checkpoints[method])
            if not path.is_file():
                raise ConfigError(f"checkpoints.{method}", f"{path} does not exist")
            from mimlab.utils.io import sha256_file

            digest = sha256_file(path)
            return self.runner.run(name, {"checkpoint": str(path.resolve()), "sha256": digest},
                                   lambda d: {"model": str(path.resolve()), "imported": True}).outputs
        pcfg = self.pretrain_config(method, self.runner.stage_dir(name))

        def build(d: Path) -> dict[str, Any]:
            from mimlab.pretrain.api import pretrain

            res = pretrain(dataclasses.replace(pcfg, resume=_interrupted(d)))
            run = res.run or {}
            return {"model": str(res.model_path), "steps": res.step, "final_loss": _tail_mean(res.losses),
                    "img_per_s": res.img_per_s, "mask": (run.get("method_config") or {}).get("mask"),
                    "losses_head": res.losses[:10]}

        return self.runner.run(name, pcfg, build).outputs

    def random_stage(self) -> dict[str, Any]:
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

        return self.runner.run("pretrain/random", conf, build).outputs

    # ------------------------------------------------------------------------------------------------ probe
    def probe_config(self, models: dict[str, str], out: Path):
        from mimlab.probe.api import ProbeConfig

        cfg = self.cfg
        return ProbeConfig(models=tuple(f"{k}={cfg.arch}@{v}" for k, v in models.items()),
                           model_kwargs=(cfg.model_kwargs,) if cfg.model_kwargs else (), data=cfg.probe_data,
                           images=cfg.probe_images, batch_size=cfg.probe_batch_size, out=str(out), device=self.device,
                           seed=0, workers=0, progress=self.progress, report=False, bootstrap=cfg.bootstrap)

    def probe_stage(self, models: dict[str, str]) -> dict[str, Any]:
        pcfg = self.probe_config(models, self.runner.stage_dir("probe"))

        def build(d: Path) -> dict[str, Any]:
            from mimlab.probe.run import run_probe

            run_probe(pcfg)
            return {"metrics": str(d / "metrics.json"), "replicates": str(d / "replicates.npz")}

        deps = tuple(f"pretrain/{k}" for k in models)
        return self.runner.run("probe", pcfg, build, deps=deps).outputs

    def simmim_baseline_stage(self, mask: dict[str, Any] | None) -> dict[str, Any]:
        """SimMIM's loss for the best trivial predictor (each image's visible mean colour), on held-out images."""
        args = {"data": self.cfg.pretrain_data, "mask": mask, "images": 256}     # mean_colour_baseline's

        def build(d: Path) -> dict[str, Any]:
            from mimlab.pretrain.simmim import mean_colour_baseline

            return {"mean_colour_l1": mean_colour_baseline(**args)}

        return self.runner.run("baseline/simmim", args, build, deps=("pretrain/simmim",)).outputs

    # --------------------------------------------------------------------------------------------- transfer
    def transfer_config(self, label: str, model_path: str, task: str, seed: int, data: str, drop: int, out: Path):
        from mimlab.transfer.api import TransferConfig

        cfg = self.cfg
        return TransferConfig(task=task, backbone=f"{label}={cfg.arch}@{model_path}", data=data, out=out,
                              model_kwargs=self.kwargs, steps=cfg.transfer_steps.get(task),
                              batch_size=cfg.transfer_batch_size, seed=seed, device=self.device,
                              drop_last_blocks=drop, progress=self.progress, precision=cfg.precision)

    def transfer_stage(self, label: str, model_path: str, task: str, seed: int, data: str,
                       drop: int = 0) -> dict[str, Any]:
        name = f"transfer/{label}{f'-drop{drop}' if drop else ''}/{task}/s{seed}"
        tcfg = self.transfer_config(label, model_path, task, seed, data, drop, self.runner.stage_dir(name))

        def build(d: Path) -> dict[str, Any]:
            from mimlab.transfer.api import run_transfer

            rep = run_transfer(dataclasses.replace(tcfg, resume=_interrupted(d)))
            return {"metrics": rep["metrics"], "baseline": rep["baseline"]}

        return self.runner.run(name, tcfg, build, deps=(f"data/{task}", f"pretrain/{label}")).outputs

    # ---------------------------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        """Run (or resume) the study; `OUT` is locked for the run's lifetime, so a second `mimlab reproduce`
        into the same directory fails at once instead of corrupting this one."""
        from mimlab.utils.io import remove_stale_temps
        from mimlab.utils.lock import run_lock

        with run_lock(self.out, verb="mimlab reproduce"):
            remove_stale_temps(self.out, recursive=True)  # half-written files of a killed run (report, stages)
            return self._run()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.log(cfg.scale_line())
        if "simmim" not in cfg.methods or "supervised" not in cfg.methods:
            raise ConfigError("methods", "must hold both 'simmim' and 'supervised': the study compares them")
        data = {t: self.data_stage(t) for t in cfg.tasks}
        pre = {m: self.pretrain_stage(m) for m in cfg.methods}
        pre["random"] = self.random_stage()
        models = {k: v["model"] for k, v in pre.items()}
        probe = self.probe_stage(models)
        baseline = self.simmim_baseline_stage(pre["simmim"].get("mask")) if "simmim" not in cfg.checkpoints else {}
        downstream: dict[str, dict[str, Any]] = {}
        for label in cfg.transfer_models:
            if label not in models:
                raise ConfigError("transfer_models", f"'{label}' is not one of the models {sorted(models)}")
            for task in cfg.tasks:
                for seed in cfg.seeds:
                    downstream.setdefault(label, {}).setdefault(task, []).append(
                        self.transfer_stage(label, models[label], task, seed, data[task]))
        if cfg.ablation_blocks:
            label = f"supervised-drop{cfg.ablation_blocks}"
            for task in cfg.ablation_tasks:
                if task not in cfg.tasks:
                    continue
                for seed in cfg.seeds:
                    downstream.setdefault(label, {}).setdefault(task, []).append(
                        self.transfer_stage("supervised", models["supervised"], task, seed, data[task],
                                            drop=cfg.ablation_blocks))
        from mimlab.report.study import write_study_report
        from mimlab.reproduce.summary import build_summary

        summary = build_summary(cfg, pre, probe, baseline, downstream, self.runner.records)
        paths = write_study_report(summary, probe, self.out)
        summary["paths"] = {k: str(v) for k, v in paths.items()}
        return summary
