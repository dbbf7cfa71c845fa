"""`pretrain(PretrainConfig) -> PretrainResult`: SimMIM, MAE or supervised pretraining of a timm encoder.

Outputs in ``out``: ``checkpoints/last.pt`` (full training state, see `mimlab.engine`), ``model.safetensors``
(the encoder as a plain timm state dict: loads strictly into ``create_model(arch, same kwargs)``, no mask token,
decoder or classifier keys; ``model_ema.safetensors`` too with EMA), ``metrics.csv`` (one row per step),
``<callback>.csv`` for each engine callback (the online probe of `mimlab.probe.online` writes ``probe.csv``),
``tensorboard/`` and ``run.json`` (config, lr rule, mask geometry, data, result, provenance).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from mimlab.errors import ConfigError, MimlabError, plain

if TYPE_CHECKING:
    from mimlab.data.spec import DataSpec
    from mimlab.engine import Callback

METHODS = ("simmim", "mae", "supervised")
LR_REFERENCE_BATCH = 512  # lr = base_lr * global_batch / 512 (SimMIM's rule; MAE/DeiT bases are converted to it)


@dataclass(frozen=True)
class MethodDefaults:
    base_lr: float          # per 512 images
    warmup_fraction: float  # of the run
    warmup_lr: float        # per 512 images
    min_lr: float           # per 512 images
    schedule: str
    milestones: tuple[float, ...]
    betas: tuple[float, float]
    clip_grad: float | None
    weight_decay: float


# Official recipes: SimMIM ViT-B 800 ep (base 1e-4, warmup 10 ep from 5e-7, x0.1 at ep 700, clip 5);
# MAE (blr 1.5e-4 per 256 = 3e-4 per 512, warmup 40/800 ep, cosine, betas 0.9/0.95);
# DeiT (5e-4 per 512, warmup 5/300 ep from 1e-6, cosine to 1e-5).
METHOD_DEFAULTS = {
    "simmim": MethodDefaults(1e-4, 10 / 800, 5e-7, 5e-6, "step", (0.875,), (0.9, 0.999), 5.0, 0.05),
    "mae": MethodDefaults(3e-4, 40 / 800, 0.0, 0.0, "cosine", (), (0.9, 0.95), None, 0.05),
    "supervised": MethodDefaults(5e-4, 5 / 300, 1e-6, 1e-5, "cosine", (), (0.9, 0.999), None, 0.05),
}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run depends on (the `mimlab pretrain` flags; None = the method's recipe)."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"out", "resume", "overwrite", "save_every", "workers",
                                                      "threads", "log_every", "tensorboard", "trackers", "progress",
                                                      "stop_after"})

    method: str
    model: str
    data: str = "builtin"
    out: str | Path = "runs/pretrain"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 128              # global batch per optimizer step
    lr: float | None = None            # BASE lr per 512 images; None = the method's official value
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    deterministic: bool = False
    device: str = "auto"
    compile: bool = False
    precision: str = "fp32"
    accum_steps: int = 1
    workers: int | None = None         # DataLoader workers; None = auto
    threads: int | None = None         # torch intra-op threads; None = torch's default
    warmup_steps: int | None = None
    schedule: str | None = None
    milestones: tuple[float, ...] | None = None
    weight_decay: float | None = None
    clip_grad: float | None = -1.0     # -1 = the method's default; None/0 = off
    ema_decay: float | None = None
    drop_path: float | None = None     # drop_path_rate for the encoder (unless in model_kwargs)
    mask_ratio: float | None = None    # SimMIM 0.6, MAE 0.75
    mask_patch_size: int | None = None  # SimMIM mask cell (px); None = 32 px scaled to the input
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    norm_pix_loss: bool = True
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    crop_scale: tuple[float, float] | None = None  # RandomResizedCrop area range; None = the method's (CROP_SCALE)
    bad_images: str = "fail"
    log_every: int = 10
    tensorboard: bool = True
    trackers: tuple[str, ...] | None = None  # tensorboard, csv, wandb, mlflow (engine.trackers); None: tensorboard
    progress: bool = True
    stop_after: int | None = None      # testing: stop like a killed run after this step


@dataclass
class PretrainResult:
    out: Path
    model_path: Path | None
    step: int
    final_loss: float | None
    img_per_s: float | None
    losses: list[float]
    run: dict[str, Any]
    train: Any


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(msg: str) -> None:
    if _is_main():
        print(msg, file=sys.stderr)


def _loss_simmim(net, batch):
    from mimlab.data.images import normalize

    return net(normalize(batch["image"]), batch["mask"])


def _loss_mae(net, batch):
    from mimlab.data.images import normalize

    return net(normalize(batch["image"]), batch["noise"])


class _NormalizedLoss:
    """Normalise the uint8 batch on the device, then apply `loss`."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, net, batch):
        from mimlab.data.images import normalize

        return self.loss(net, {**batch, "image": normalize(batch["image"])})


def method_loss(method: str, num_classes: int = 0, *, label_smoothing: float = 0.1, mixup: float = 0.0,
                cutmix: float = 0.0):
    """The engine loss_fn of a method (batches from `PretrainDataset`: uint8 images normalised on the device)."""
    from mimlab.pretrain.supervised import SupervisedLoss

    if method == "simmim":
        return _loss_simmim
    if method == "mae":
        return _loss_mae
    return _NormalizedLoss(SupervisedLoss(num_classes, label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix))


def auto_workers(in_memory: bool, device: str) -> int:
    """DataLoader workers: in-memory data on CPU needs none (workers would steal the compute cores);
    files or a GPU get up to 8 per process, sharing the CPUs with the other processes of this node
    (torchrun's LOCAL_WORLD_SIZE) and leaving one core to each main process."""
    cpus = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if in_memory and not str(device).startswith("cuda") and not (device == "auto" and _cuda()):
        return 0
    return max(0, min(8, cpus - 1))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def export_encoder_state(encoder, arch: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The encoder's state dict restricted to what ``create_model(arch, model_kwargs)`` (headless) holds.

    Only classifier keys may be dropped (supervised); any other difference is an error, so the file always
    loads strictly into the same architecture.
    """
    from mimlab.models.factory import create_model

    ref, _ = create_model(arch, model_kwargs, num_classes=0)
    want = ref.state_dict()
    have = encoder.state_dict()
    extra = sorted(set(have) - set(want))
    non_head = [k for k in extra if not k.startswith(("head.", "head_dist."))]
    missing = sorted(set(want) - set(have))
    if missing or non_head:
        raise MimlabError(f"internal: exported encoder does not match {arch}: missing {missing[:5]}, "
                          f"unexpected {non_head[:5]}")
    out = {}
    for k, v in want.items():
        if have[k].shape != v.shape:
            raise MimlabError(f"internal: exported {k} has shape {tuple(have[k].shape)}, {arch} wants {tuple(v.shape)}")
        out[k] = have[k].detach().cpu().contiguous()
    return out


def _save_weights(sd: dict[str, Any], path: Path) -> None:
    from mimlab.models.checkpoints import save_state_dict

    save_state_dict(sd, path)


def pretrain(cfg: PretrainConfig, callbacks: Sequence["Callback"] = ()) -> PretrainResult:
    """Run one pretraining; the output directory is locked for the run's lifetime (`mimlab.utils.lock`), so a
    second run into the same ``out`` fails at once instead of corrupting this one (rank 0 holds the lock).

    `callbacks`: engine callbacks run during training (e.g. `mimlab.probe.online.online_probe`, which the CLI adds
    for ``--probe-every``); each writes ``<name>.csv``."""
    from mimlab.utils.lock import run_lock

    import torch

    check_config(cfg)
    threads = torch.get_num_threads()
    try:
        if not _is_main():
            return _pretrain(cfg, callbacks)
        with run_lock(cfg.out, verb="mimlab pretrain"):
            return _pretrain(cfg, callbacks)
    finally:
        torch.set_num_threads(threads)         # `threads` is this run's, not the calling process's from now on


def check_config(cfg: PretrainConfig) -> None:
    """Every check that needs no data or model, before anything is printed or built."""
    if cfg.trackers is not None:
        from mimlab.engine.trackers import check_trackers

        check_trackers(cfg.trackers)
    if cfg.method not in METHODS:
        raise ConfigError("method", f"must be one of {', '.join(METHODS)}, got '{cfg.method}'")
    if cfg.crop_scale is not None:
        cs = tuple(cfg.crop_scale)
        if len(cs) != 2 or not all(isinstance(v, (int, float)) for v in cs) or not 0 < cs[0] <= cs[1] <= 1:
            raise ConfigError("crop_scale", f"must be LOW,HIGH with 0 < LOW <= HIGH <= 1, got {plain(cfg.crop_scale)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError("threads", f"must be >= 1, got {cfg.threads}")
    for name in ("steps", "batch_size", "accum_steps"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError("lr", f"must be a positive number, got {cfg.lr}")


@dataclass
class _Method:
    """The method's network around the encoder, what its dataset must draw per sample, and its description."""

    net: Any
    mask_fn: Any = None            # SimMIM: rng -> token mask
    num_tokens: int = 0            # MAE: noise values per sample
    info: dict[str, Any] = field(default_factory=dict)


def _build_method(cfg: PretrainConfig, encoder, img_size: tuple[int, int], num_classes: int) -> _Method:
    from mimlab.pretrain.mae import MAE
    from mimlab.pretrain.masking import MAE_MASK_RATIO, SIMMIM_MASK_RATIO, MaskGeometry, choose_mask_patch_size
    from mimlab.pretrain.simmim import SimMIM, encoder_geometry
    from mimlab.pretrain.supervised import Supervised

    if cfg.method == "simmim":
        g = encoder_geometry(encoder)
        mps = cfg.mask_patch_size or choose_mask_patch_size(img_size, g["patch_size"])
        geom = MaskGeometry(img_size, g["patch_size"], mps, cfg.mask_ratio or SIMMIM_MASK_RATIO)
        info = {"mask": geom.describe(), "encoder_stride": g["stride"], "family": g["family"],
                "mask_patch_size_rule": "given" if cfg.mask_patch_size else
                "official 32 px if the image is >= 192 px, else ~ side/7 (multiple of the patch size)"}
        m = info["mask"]
        _say(f"SimMIM mask: {m['mask_patch_size']} px cells on a {m['mask_cells'][0]}x{m['mask_cells'][1]} grid "
             f"({img_size[0]}x{img_size[1]} px, patch {g['patch_size']}), {m['masked_cells']} masked "
             f"(ratio {geom.mask_ratio}), AvgDist {m['avg_dist_px']:.2f} px; encoder stride {g['stride']}")
        return _Method(SimMIM(encoder), mask_fn=geom.sample, info=info)
    if cfg.method == "mae":
        net = MAE(encoder, mask_ratio=cfg.mask_ratio or MAE_MASK_RATIO, decoder_dim=cfg.decoder_dim,
                  decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads, norm_pix_loss=cfg.norm_pix_loss)
        d = net.decoder_config
        _say(f"MAE: {d['keep_tokens']}/{d['tokens']} tokens visible (ratio {d['mask_ratio']}), decoder "
             f"{d['decoder_depth']} x {d['decoder_dim']} ({d['decoder_heads']} heads), norm_pix_loss "
             f"{d['norm_pix_loss']}")
        return _Method(net, num_tokens=net.num_tokens, info={"mae": net.decoder_config})
    return _Method(Supervised(encoder), info={"num_classes": num_classes, "label_smoothing": cfg.label_smoothing,
                                             "mixup": cfg.mixup, "cutmix": cfg.cutmix})


def _build_dataset(cfg: PretrainConfig, spec: DataSpec, files, labels, num_classes: int, img_size: tuple[int, int],
                   method: _Method):
    """The augmented dataset and its description for run.json."""
    from mimlab.data.builtin import builtin_array
    from mimlab.data.images import IMAGENET_MEAN, IMAGENET_STD, ArraySource, FileSource
    from mimlab.pretrain.data import CROP_SCALE, Augment, PretrainDataset

    if spec.kind == "builtin":
        p = spec.params
        size = p.get("size", max(img_size))
        images, labels, cache = builtin_array(p["kind"], classes=p["classes"], per_class=p["per_class"],
                                              size=size, seed=p["seed"])
        source = ArraySource(images, labels)
        info = {"kind": "builtin", "generator": p["kind"], "classes": p["classes"], "per_class": p["per_class"],
                "size": size, "seed": p["seed"], "images": len(source), "cache": str(cache) if cache else None}
    else:
        source = FileSource(files, labels)
        info = {"kind": "folder", "path": str(spec.path.resolve()), "images": len(source), "classes": num_classes}
    crop_scale = tuple(cfg.crop_scale) if cfg.crop_scale is not None else CROP_SCALE[cfg.method]
    dataset = PretrainDataset(source, Augment(img_size, crop_scale), target=cfg.method, mask_fn=method.mask_fn,
                              num_tokens=method.num_tokens, bad_images=cfg.bad_images)
    info["augmentation"] = {"random_resized_crop_scale": list(crop_scale), "ratio": [3 / 4, 4 / 3], "hflip": True,
                            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return dataset, info


def _run_info(cfg: PretrainConfig) -> dict[str, Any]:
    """What the trackers record about the run: its config and provenance."""
    from mimlab.utils.provenance import provenance

    return {"verb": "pretrain", "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "provenance": provenance()}


def _train_config(cfg: PretrainConfig, out: Path, identity: dict[str, Any], in_memory: bool):
    """The engine's TrainConfig from the method's recipe (METHOD_DEFAULTS) and the user's overrides."""
    from mimlab.engine import TrainConfig

    defaults = METHOD_DEFAULTS[cfg.method]
    base_lr = cfg.lr if cfg.lr is not None else defaults.base_lr
    scale = cfg.batch_size / LR_REFERENCE_BATCH
    lr = base_lr * scale
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(defaults.warmup_fraction * cfg.steps))
    clip = defaults.clip_grad if cfg.clip_grad == -1.0 else (cfg.clip_grad or None)
    schedule = cfg.schedule or defaults.schedule
    milestones = tuple(cfg.milestones) if cfg.milestones is not None else defaults.milestones
    _say(f"lr = base {base_lr:g} x batch {cfg.batch_size} / {LR_REFERENCE_BATCH} = {lr:.3g}; {schedule} schedule, "
         f"{warmup} warmup steps, {cfg.steps} steps")
    workers = cfg.workers if cfg.workers is not None else auto_workers(in_memory, cfg.device)
    tcfg = TrainConfig(
        out_dir=out, steps=cfg.steps, batch_size=cfg.batch_size, lr=lr,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else defaults.weight_decay,
        betas=defaults.betas, schedule=schedule, warmup_steps=warmup, warmup_lr=defaults.warmup_lr * scale,
        min_lr=defaults.min_lr * scale, milestones=milestones, clip_grad=clip, accum_steps=cfg.accum_steps,
        precision=cfg.precision, compile=cfg.compile, ema_decay=cfg.ema_decay, seed=cfg.seed,
        deterministic=cfg.deterministic, device=cfg.device, num_workers=workers, save_every=cfg.save_every,
        log_every=cfg.log_every, resume=cfg.resume, overwrite=cfg.overwrite, tensorboard=cfg.tensorboard,
        trackers=cfg.trackers, run_info=_run_info(cfg), progress=cfg.progress, identity=identity,
        stop_after=cfg.stop_after,
        owned_outputs=("model.safetensors", "model_ema.safetensors", "run.json", "loss.png", "loss.pdf",
                                      "loss.svg"))
    lr_info = {"base_lr": base_lr, "lr": lr, "rule": f"base_lr * global_batch / {LR_REFERENCE_BATCH}",
               "schedule": schedule, "warmup_steps": warmup, "milestones": list(milestones),
               "warmup_lr": tcfg.warmup_lr, "min_lr": tcfg.min_lr}
    optimizer = {"name": "AdamW", "betas": list(tcfg.betas), "weight_decay": tcfg.weight_decay, "clip_grad": clip,
                 "no_weight_decay": "1-d tensors, biases, pos-embed, cls/mask tokens, relative position tables"}
    return tcfg, lr_info, optimizer


def _pretrain(cfg: PretrainConfig, callbacks: Sequence["Callback"]) -> PretrainResult:
    import torch

    from mimlab.data.images import scan_class_folders
    from mimlab.data.spec import parse_data_spec
    from mimlab.engine import seed_everything, train
    from mimlab.models.factory import create_model
    from mimlab.utils.io import atomic_write_json
    from mimlab.utils.provenance import provenance

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    spec = parse_data_spec(cfg.data)

    # --- data source first (supervised needs the class count to build the head) -------------------------------
    files = labels = None
    if spec.kind == "folder":
        files, labels, class_names = scan_class_folders(spec.path)
        if cfg.method == "supervised" and len(class_names) < 2:
            raise ConfigError("data", f"{spec.path}: supervised pretraining needs >= 2 class folders "
                                      f"(ROOT/CLASS/*.jpg), found {len(class_names)}")
        num_classes = len(class_names)
    else:
        num_classes = spec.params["classes"]

    # --- model and method --------------------------------------------------------------------------------------
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path is not None and "drop_path_rate" not in kwargs:
        kwargs["drop_path_rate"] = cfg.drop_path
    seed_everything(cfg.seed)
    encoder, _ = create_model(cfg.model, kwargs, num_classes=num_classes if cfg.method == "supervised" else 0)
    pe = getattr(encoder, "patch_embed", None)
    if pe is None or not hasattr(pe, "img_size"):
        raise ConfigError("model", f"{cfg.model}: not a patch-embedding transformer (ViT/BEiT/Swin) that mimlab "
                                   "can pretrain")
    img_size = tuple(int(s) for s in (pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size,) * 2))
    method = _build_method(cfg, encoder, img_size, num_classes)
    dataset, data_info = _build_dataset(cfg, spec, files, labels, num_classes, img_size, method)

    # --- optimisation and training ------------------------------------------------------------------------------
    identity = {"method": cfg.method, "model": cfg.model, "model_kwargs": kwargs,
                "data": {k: v for k, v in data_info.items() if k != "cache"}, "method_config": method.info}
    tcfg, lr_info, optimizer = _train_config(cfg, out, identity, spec.kind == "builtin")
    loss_fn = method_loss(cfg.method, num_classes, label_smoothing=cfg.label_smoothing, mixup=cfg.mixup,
                          cutmix=cfg.cutmix)
    run = {
        "method": cfg.method, "model": cfg.model, "model_kwargs": kwargs, "data": data_info,
        "method_config": method.info, "lr": lr_info, "optimizer": optimizer,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "callbacks": [{"name": cb.name, "every": cb.every} for cb in callbacks],
        "num_workers": tcfg.num_workers,
    }
    result = train(method.net, loss_fn, dataset, tcfg, callbacks=callbacks, extra_state={"run": run})

    model_path = None
    if _is_main():
        if not result.stopped_early:
            model_path = _export(method.net, cfg, kwargs, out)
        run["result"] = {"step": result.step, "finished": not result.stopped_early, "final_loss": result.final_loss,
                         "img_per_s": result.img_per_s, "img_per_s_with_warmup": result.img_per_s_with_warmup,
                         "elapsed_s": round(result.elapsed_s, 3),
                         "resumed_from_step": result.start_step or None, "skipped_images": result.skipped_samples,
                         "model": str(model_path) if model_path else None,
                         "checkpoint": str(result.checkpoint) if result.checkpoint else None}
        run["provenance"] = provenance()
        atomic_write_json(out / "run.json", _jsonable(run))
        if result.skipped_samples:
            _say(f"skipped {result.skipped_samples} unreadable image reads (see the warnings above)")
        if model_path:
            _say(f"wrote {model_path} (use it as {cfg.model}@{model_path} with the same model_kwargs "
                 "(--model-kwargs))")
    return PretrainResult(out=out, model_path=model_path, step=result.step, final_loss=result.final_loss,
                          img_per_s=result.img_per_s, losses=result.losses, run=run, train=result)


def _export(net, cfg: PretrainConfig, kwargs: dict[str, Any], out: Path) -> Path:
    """model.safetensors (and model_ema.safetensors with an EMA): the encoder as a plain timm state dict."""
    model_path = out / "model.safetensors"
    _save_weights(export_encoder_state(net.encoder, cfg.model, kwargs), model_path)
    if cfg.ema_decay:
        import copy

        from mimlab.engine.state import load_checkpoint

        ema_net = copy.deepcopy(net).cpu()
        ema_net.load_state_dict(load_checkpoint(out / "checkpoints" / "last.pt")["ema"])
        _save_weights(export_encoder_state(ema_net.encoder, cfg.model, kwargs), out / "model_ema.safetensors")
    return model_path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
