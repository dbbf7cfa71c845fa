"""Study configurations: the built-in presets and config files (YAML or TOML) that override them."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mimlab.errors import ConfigError, MimlabError

SMALL_VIT = "img_size=32,patch_size=4,depth=6,embed_dim=128,num_heads=4"


@dataclass
class StudyConfig:
    """Everything a study run depends on. Changing a field reruns exactly the stages that use it."""

    preset: str = "quick"
    description: str = ""
    device: str = "auto"
    precision: str = "fp32"
    # models: one architecture for every method (same init seed, same budget)
    arch: str = "vit_tiny_patch16_224"
    model_kwargs: str = SMALL_VIT
    methods: tuple[str, ...] = ("simmim", "supervised")        # add "mae" to include it
    init_seed: int = 0
    # pretraining (identical budget for every method)
    pretrain_data: str = "builtin:fractal-leaves?classes=20&per_class=200&seed=0"
    pretrain_steps: int = 120
    pretrain_batch_size: int = 64
    pretrain_lr: float | None = 8e-3          # base lr per 512 images (None: each method's official value, which
    #                                           suits hundreds of epochs, not a few hundred steps)
    mask_patch_size: int | None = None       # None: SimMIM's 32 px cell scaled to the input (see mimlab pretrain)
    # RandomResizedCrop area range for every method (one augmentation for all: a controlled comparison); None =
    # each method's own (SimMIM 0.67-1, MAE 0.2-1, supervised/DeiT 0.08-1). DeiT's 8% crops of a 32 px image often
    # miss the fractal that defines the class: the supervised model then stays at chance (docs/pretrain.md)
    pretrain_crop_scale: tuple[float, float] | None = (0.67, 1.0)
    # user checkpoints instead of pretraining: {"simmim": "path", "supervised": "path", ...} (+ "arch" per model)
    checkpoints: dict[str, str] = field(default_factory=dict)
    # probe
    probe_data: str = "builtin"              # held-out built-in images, or a folder / .npy
    probe_images: int = 128
    probe_batch_size: int = 32
    bootstrap: int = 200
    # transfer
    tasks: tuple[str, ...] = ("classify", "keypoints", "depth", "track")
    seeds: tuple[int, ...] = (0,)
    transfer_steps: dict[str, int] = field(default_factory=lambda: {"classify": 30, "keypoints": 30,
                                                                     "depth": 30, "track": 30})
    transfer_batch_size: int = 32
    transfer_models: tuple[str, ...] = ("simmim", "supervised")  # labels; "random" and "mae" are allowed
    ablation_blocks: int = 2                 # drop the last K blocks (C6); 0 = no ablation
    ablation_tasks: tuple[str, ...] = ("keypoints", "depth")
    # the built-in transfer datasets (mimlab.data.downstream) or user paths: {"classify": "path", ...}
    transfer_data: dict[str, Any] = field(default_factory=lambda: {
        "classify": {"kind": "finegrained", "num_classes": 6, "train_per_class": 100, "val_per_class": 40,
                     "size": 32},
        "keypoints": {"kind": "keypoints", "train_images": 300, "val_images": 60, "size": 64},
        "depth": {"kind": "depth", "train_images": 300, "val_images": 60, "width": 64, "height": 48},
        "track": {"kind": "tracking", "train_sequences": 40, "val_sequences": 10, "length": 30, "size": 96},
    })
    # "trained enough" gates
    gate_loss_ratio: float = 0.9
    gate_attention_change: float = 0.02
    gate_cka_to_init: float = 0.9
    # report figures (not part of any stage's key: changing them redraws the report only)
    figure_format: tuple[str, ...] = ("png",)
    figure_dpi: int = 150

    HELP: ClassVar[dict[str, str]] = {
        "preset": "the built-in preset the other keys override (quick, cpu, gpu)",
        "description": "free text, shown in the report",
        "device": "auto (CUDA if available), cpu, cuda",
        "precision": "fp32, bf16 or fp16 for pretraining and transfer",
        "arch": "the timm architecture every method trains (one architecture for all)",
        "model_kwargs": "timm keyword arguments of `arch`, as in --model-kwargs (k=v,...)",
        "methods": "pretraining methods; must hold simmim and supervised; add mae to include it",
        "init_seed": "seed of every model's initialisation (the same for all methods)",
        "pretrain_data": "pretraining images: builtin[:KIND?...] or an image folder (the same for every method)",
        "pretrain_steps": "optimizer steps of every pretraining (an identical budget)",
        "pretrain_batch_size": "global batch of every pretraining",
        "pretrain_lr": "base lr per 512 images for every method; null: each method's official value",
        "mask_patch_size": "SimMIM mask cell in px; null: SimMIM's 32 px cell scaled to the input",
        "pretrain_crop_scale": "RandomResizedCrop area range [low, high] for every method; null: each method's own",
        "checkpoints": "your checkpoints instead of pretraining: {simmim: path, supervised: path, ...}",
        "probe_data": "probe images: builtin (held-out built-in images), a folder or a .npy",
        "probe_images": "number of probe images",
        "probe_batch_size": "probe batch = CKA minibatch (at least 4)",
        "bootstrap": "Poisson bootstrap replicates of the probe's intervals (0: none)",
        "tasks": "transfer tasks: classify, keypoints, depth, track",
        "seeds": "transfer seeds (each model x task x seed is one run)",
        "transfer_steps": "steps per task: {classify: N, keypoints: N, depth: N, track: N}",
        "transfer_batch_size": "batch of every transfer run",
        "transfer_models": "models transferred: labels among methods and random",
        "ablation_blocks": "claim C6: drop the supervised model's last K blocks (0: no ablation; fewer than its depth)",
        "ablation_tasks": "tasks of the layer ablation",
        "transfer_data": "per task: a built-in dataset spec {kind: ..., sizes} or the path of your dataset",
        "gate_loss_ratio": "trained-enough gate: final loss / the trivial predictor's loss must be below this",
        "gate_attention_change": "trained-enough gate: attention statistics must move at least this from init",
        "gate_cka_to_init": "trained-enough gate: CKA to the random-init model must be below this",
        "figure_format": "figure files besides the PNG report.html embeds: [png, pdf, svg] (vector copies)",
        "figure_dpi": "resolution of the report's PNG figures",
    }

    def scale_line(self) -> str:
        crop = (f", crops {self.pretrain_crop_scale[0]:g}-{self.pretrain_crop_scale[1]:g}"
                if self.pretrain_crop_scale is not None else "")
        return (f"preset '{self.preset}': {self.arch} ({self.model_kwargs or 'default kwargs'}), "
                f"{self.pretrain_steps} pretraining steps x batch {self.pretrain_batch_size} per method on "
                f"{self.pretrain_data}{crop}; {self.probe_images} probe images; transfer {len(self.seeds)} paired seed(s) x "
                f"{self._transfer_steps_text()} steps. "
                "This is a small-scale study, not the paper's ViT-B/16 at 224 px on ImageNet.")

    def _transfer_steps_text(self) -> str:
        steps = [self.transfer_steps.get(t) for t in self.tasks]
        if len(set(steps)) == 1:
            return str(steps[0])
        return ", ".join(f"{t} {n}" for t, n in zip(self.tasks, steps))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


PRESETS: dict[str, dict[str, Any]] = {
    # make demo: at most 10 minutes on a 2-core CPU from a fresh clone, setup (~2 min) included; every stage runs,
    # verdicts are inconclusive at this scale. Measured on the 2-core VM: 524 s for the study alone with 200
    # pretraining / 60 transfer steps in a slow hour (too close); fresh-clone totals 7.0 min with 150 / 40 and
    # 6.2 min with these 120 / 30; the VM's speed varies by up to 1.8x
    "quick": {"description": "smoke-scale run of the whole study (minutes on a laptop CPU)"},
    # 36 min on the 2-core VM (2026-12-08; 66 min for 3 seeds on a slower day): 10x the pretraining (591 + 473 s),
    # 5 paired seeds x 10 transfer runs of 120 steps (22 s each). 5 seeds, not 3: the paired intervals then decide
    # keypoints, tracking and C6 (benchmarks/RESULTS.md, "5 paired seeds"). 20 classes: in 600 steps the supervised
    # model reaches 12% held-out top-1 on 20 classes (chance 5%) but only 1.6% on 100 (chance 1%)
    "cpu": {"description": "about 40 minutes on a 2-core CPU", "pretrain_steps": 2000, "pretrain_batch_size": 64,
            "pretrain_data": "builtin:fractal-leaves?classes=20&per_class=250&seed=0", "probe_images": 256,
            "seeds": (0, 1, 2, 3, 4),
            "transfer_steps": {"classify": 120, "keypoints": 120, "depth": 120, "track": 120},
            "methods": ("simmim", "supervised"), "transfer_models": ("simmim", "supervised")},
    # a lent H100: ViT-S/16-like at 64 px (8x8 grid... 16x16 with patch 4), ~5 minutes of pretraining per model
    "gpu": {"description": "one GPU, about 5 minutes of pretraining per model", "device": "cuda",
            "precision": "bf16", "arch": "vit_small_patch16_224",
            "model_kwargs": "img_size=64,patch_size=4", "pretrain_steps": 6000, "pretrain_batch_size": 256,
            "pretrain_data": "builtin:fractal-leaves?classes=1000&per_class=50&seed=0", "probe_images": 512,
            "pretrain_lr": 2e-3,
            "methods": ("simmim", "supervised", "mae"), "transfer_models": ("simmim", "supervised", "mae"),
            "seeds": (0, 1, 2), "transfer_batch_size": 64,
            "transfer_steps": {"classify": 1000, "keypoints": 1000, "depth": 1000, "track": 1000}},
}


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise MimlabError(f"config key '{name}' must be a list")
        return tuple(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise MimlabError(f"config key '{name}' must be a table/mapping")
        merged = dict(default)
        merged.update(value)
        return merged
    return value


def build_config(preset: str = "quick", overrides: dict[str, Any] | None = None) -> StudyConfig:
    if preset not in PRESETS:
        raise ConfigError("preset", f"must be one of {', '.join(PRESETS)}, not '{preset}'")
    cfg = StudyConfig(preset=preset)
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    for source in (PRESETS[preset], overrides or {}):
        for k, v in source.items():
            if k not in fields:
                raise MimlabError(f"unknown study config key '{k}' (known: {', '.join(sorted(fields))})")
            if v is None and "None" in str(fields[k].type):    # e.g. pretrain_crop_scale: null (each method's own)
                setattr(cfg, k, None)
                continue
            setattr(cfg, k, _coerce(k, v, getattr(cfg, k)))
    return cfg


def load_config_file(path: str | Path) -> StudyConfig:
    """A YAML (.yaml/.yml) or TOML (.toml) file: optional `preset` key plus overrides of StudyConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"{path}: no such file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            raise ConfigError("config", f"{path}: use a .yaml, .yml or .toml file")
    except MimlabError:
        raise
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError
        raise ConfigError("config", f"{path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: expected a mapping at the top level")
    preset = data.pop("preset", "quick")
    return build_config(preset, data)


def _yaml_value(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def config_yaml(cfg: StudyConfig) -> str:
    """The resolved config as YAML that `--config` reads back to the same config (`--print-config`)."""
    import yaml

    data = cfg.to_dict()
    lines = [f"# mimlab reproduce config: preset '{cfg.preset}' resolved; edit and pass back with --config FILE"]
    for k, v in data.items():
        lines.append(f"# {StudyConfig.HELP[k]}")
        lines.append(yaml.safe_dump({k: v}, default_flow_style=False, sort_keys=False, width=110).strip())
    return "\n".join(lines) + "\n"


def config_reference_markdown() -> str:
    """docs/reproduce.md's table of every key: type, meaning, value in each preset (generated; a test keeps the
    page equal to it)."""
    presets = {name: build_config(name).to_dict() for name in PRESETS}
    head = "| key | type | meaning | " + " | ".join(presets) + " |"
    rows = [head, "|" + "---|" * (3 + len(presets))]
    for f in dataclasses.fields(StudyConfig):
        typ = str(f.type).replace("|", "or")
        vals = " | ".join(f"`{_yaml_value(p[f.name])}`" for p in presets.values())
        rows.append(f"| `{f.name}` | {typ} | {StudyConfig.HELP[f.name]} | {vals} |")
    return "\n".join(rows) + "\n"
