"""`run_probe(ProbeConfig)`: the `mimlab probe` job. Models from specs, images from a folder, a .npy array or the
built-in generators, one streaming pass (`api.probe_pass`), metrics.json on disk."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from mimlab.data.spec import is_builtin, parse_data_spec
from mimlab.errors import ConfigError, MimlabError
from mimlab.models.factory import ModelSpec, check_arch, create_model, parse_model_kwargs, parse_model_spec
from mimlab.probe.api import ProbeConfig, ProbeModel, ProbeResult, check_counts, probe_pass

if TYPE_CHECKING:
    from mimlab.probe.distributed import BatchPlan

HF_PREFIX = "hf:"
DEFAULT_IMAGES = 256                 # images probed when `images` is not given (fewer if the data has fewer)


def model_specs(cfg: ProbeConfig) -> list[ModelSpec]:
    """The models of a job, parsed and checked (labels unique, checkpoints present) before anything is built."""
    if not cfg.models:
        raise ConfigError("models", "names no model: give at least one [LABEL=]ARCH[@CHECKPOINT]")
    kw = list(cfg.model_kwargs)
    per_model = [parse_model_kwargs(kw[0] if len(kw) == 1 else kw[i]) if kw else {} for i in range(len(cfg.models))]
    specs = [parse_model_spec(m, per_model[i]) for i, m in enumerate(cfg.models)]
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise MimlabError(f"duplicate model label(s) {', '.join(dup)}: name them, e.g. a=ARCH@CKPT b=ARCH@CKPT")
    for s in specs:
        if s.arch.startswith(HF_PREFIX):
            if s.checkpoint is not None:
                raise MimlabError(f"{s.label}: hf:PATH models load their weights from PATH; drop '@{s.checkpoint}'")
            if s.kwargs:
                raise ConfigError("model_kwargs", f"do not apply to hf:PATH models ({s.label}: their config.json "
                                  "defines them)")
            if s.label == s.arch:    # default label: the directory name (a label may not contain '/')
                s.label = HF_PREFIX + (Path(s.arch[len(HF_PREFIX):]).name or "model")
            continue
        check_arch(s.arch)
        if s.checkpoint is not None and not Path(s.checkpoint).exists():
            raise MimlabError(f"{s.label}: checkpoint {s.checkpoint} does not exist")
    return specs


# what follows the last block: the probe never reads it, so a checkpoint's classifier (or final norm of another
# kind) is dropped with one line, and the model's own stays at initialisation, instead of failing the load
HEAD_KEYS = ("head.*", "head_dist.*", "pre_logits.*", "fc_norm.*", "norm.*", "attn_pool.*")


def _img_size_kwargs(cfg: ProbeConfig, spec: ModelSpec) -> dict[str, Any]:
    """`img_size` for timm from `cfg.img_size` (an explicit request; it must not contradict --model-kwargs)."""
    if cfg.img_size is None:
        return {}
    given = spec.kwargs.get("img_size")
    if given is not None and tuple(given if isinstance(given, (tuple, list)) else (given, given)) != cfg.img_size:
        raise ConfigError("img_size", f"{cfg.img_size[0]}x{cfg.img_size[1]} contradicts img_size={given} in the "
                                      f"model kwargs of {spec.label}")
    return {"img_size": cfg.img_size}


def build_models(cfg: ProbeConfig, quiet: bool = False) -> list[ProbeModel]:
    say = (lambda line: None) if quiet else print     # other ranks of a multi-process run stay quiet
    out = []
    for spec in model_specs(cfg):
        if spec.arch.startswith(HF_PREFIX):
            from mimlab.models.hf import load_hf_model

            path = spec.arch[len(HF_PREFIX):]
            model, info = load_hf_model(path)
            if cfg.img_size is not None:        # fed at this size (pos encodings interpolated by the model)
                model.mimlab_input_size = cfg.img_size
                info["img_size_requested"] = list(cfg.img_size)
            if info.get("unused_keys"):
                say(f"{spec.label}: the probe does not use the directory's {_head_text(info['unused_keys'])}")
            out.append(ProbeModel(label=spec.label, model=model, arch=spec.arch, checkpoint=str(Path(path).resolve()),
                                  random_init=False, extra=info))
            continue
        size = _img_size_kwargs(cfg, spec)
        kwargs = {**spec.kwargs, **size}
        # the size asked for (--img-size, or img_size in the model kwargs) allows resampling position embeddings
        resize = cfg.resize_pos_embed or "img_size" in kwargs
        model, report = create_model(spec.arch, kwargs, checkpoint=spec.checkpoint,
                                     checkpoint_format=cfg.checkpoint_format, unused=HEAD_KEYS,
                                     resize_pos_embed=resize)
        extra: dict[str, Any] = {"model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
        if report is not None:
            extra["checkpoint_format"] = report.format
            if report.dropped:
                extra["checkpoint_dropped_keys"] = report.dropped
            line = report.unused_line()
            if line:
                extra["checkpoint_unused"] = {"dropped": report.unused_dropped, "left_at_init": report.unused_at_init,
                                              "reason": "after the last block: the probe does not read it"}
                say(f"{spec.label}: {line} (after the last block: the probe does not read it)")
            if report.resized:
                extra["checkpoint_resized"] = report.resized
                say(f"{spec.label}: resampled {', '.join(report.resized)} to the requested input size")
            _checkpoint_notices(spec.label, report, extra, quiet)
        out.append(ProbeModel(label=spec.label, model=model, arch=spec.arch, checkpoint=spec.checkpoint,
                              checkpoint_sha256=report.sha256 if report is not None else None,
                              random_init=spec.checkpoint is None, extra=extra))
    return out


def _checkpoint_notices(label: str, report, extra: dict[str, Any], quiet: bool) -> None:
    """Half-precision weights cast up (a note) and all-constant weights (a warning), said and recorded."""
    cast = report.cast_line()
    if cast:
        extra["checkpoint_cast"] = report.cast_from
        if not quiet:
            print(f"{label}: {cast}", file=sys.stderr)
    warning = report.constant_warning()
    if warning:
        extra["checkpoint_constant_weights"] = True
        if not quiet:
            print(f"WARNING: {label}: {warning}", file=sys.stderr)


def _head_text(keys: list[str]) -> str:
    """'23 tensors outside its image encoder (text_model.*: 20, logit_scale, ...)', grouped by top-level name."""
    groups: dict[str, int] = {}
    for k in keys:
        top = k.split(".", 1)[0] + (".*" if "." in k else "")
        groups[top] = groups.get(top, 0) + 1
    parts = [f"{g}: {n}" if n > 1 else g for g, n in groups.items()]
    shown = ", ".join(parts[:6]) + (f", ... (+{len(parts) - 6})" if len(parts) > 6 else "")
    return f"{len(keys)} tensors outside its image encoder ({shown})"


def _transform_for(model: torch.nn.Module):
    import timm.data

    from mimlab.models.hf import is_hf_model
    from mimlab.probe.families import adapter_for

    size = adapter_for(model).img_size
    if is_hf_model(model):
        cfg = _hf_data_config(model, size)
    else:
        cfg = timm.data.resolve_model_data_config(model)
    # the pretrained config describes the registered size; the model in hand may have been built for another
    cfg["input_size"] = (3, *size)
    return timm.data.create_transform(**cfg, is_training=False), cfg


def _hf_data_config(model: torch.nn.Module, size) -> dict:
    """Normalisation of a HF model: image_mean/std of preprocessor_config.json next to its weights if present,
    else ImageNet's; images are resized (bicubic) and centre-cropped to the model's size (crop_pct 1)."""
    import json

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    src = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    pp = Path(src) / "preprocessor_config.json" if src else None
    if pp is not None and pp.is_file():
        try:
            d = json.loads(pp.read_text())
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
        except (OSError, ValueError) as e:
            raise MimlabError(f"cannot read {pp}: {e}") from None
    return {"input_size": (3, *size), "interpolation": "bicubic", "mean": tuple(mean), "std": tuple(std),
            "crop_pct": 1.0, "crop_mode": "center"}


@dataclass(frozen=True)
class DataSource:
    """What `--data` holds, read before any model is built: its kind, how many images the run takes, and the files
    (folder) or the array (.npy) they come from."""
    kind: str
    count: int
    files: list[Path] | None = None
    array: torch.Tensor | None = None


def data_source(cfg: ProbeConfig) -> DataSource:
    from mimlab.data.images import list_images, load_npy

    path = cfg.data
    if is_builtin(path):
        if cfg.images == "all":
            raise ConfigError("images", "'all' has no meaning for built-in data (it has no end): give a number")
        return DataSource("builtin", cfg.images or DEFAULT_IMAGES)
    if path.endswith(".npy"):
        x = load_npy(path)
        n = _take(cfg.images, x.shape[0], path)
        return DataSource("npy", n, array=x[:n])
    files = list_images(path)
    n = _take(cfg.images, len(files), path)
    return DataSource("folder", n, files=files[:n])


def _take(images: int | str | None, available: int, path: str) -> int:
    """How many of `available` images a run takes: N (which must exist), all, or by default up to 256."""
    if images == "all":
        return available
    if images is None:
        return min(DEFAULT_IMAGES, available)
    if images > available:
        raise ConfigError("images", f"{images}: {path} holds only {available} images")
    return images


def make_batches(cfg: ProbeConfig, models: Sequence[ProbeModel], source: DataSource | None = None,
                 plan: "BatchPlan | None" = None):
    """Return (iterable of batches with one tensor per model, number of images, data description); with a `plan`
    (several processes), the batches are this rank's only and the number is the whole run's."""
    from torch.utils.data import DataLoader

    from mimlab.data.images import MultiTransformImages, RepeatTensor

    source = source or data_source(cfg)
    path = cfg.data
    transforms, cfgs = zip(*(_transform_for(pm.model) for pm in models))
    if source.kind == "builtin":
        from mimlab.data.synthetic import SyntheticImages

        spec = parse_data_spec(path, defaults={})     # builtin[:KIND][?classes=..&seed=..]; unset keys below
        kind = spec.params["kind"]
        count = source.count
        classes = spec.params.get("classes", min(count, 16))
        size = spec.params.get("size", max(max(c["input_size"][1:]) for c in cfgs))
        # held-out images: indices far from any training set made with the defaults
        ds = SyntheticImages(kind, classes=classes, per_class=-(-count // classes), size=size,
                             seed=spec.params.get("seed", cfg.seed), offset=1_000_000)
        dataset = MultiTransformImages(range(count), transforms, load=partial(_synthetic_image, ds))
        desc = {"kind": "builtin", "generator": kind, "classes": classes, "size": size, "offset": 1_000_000}
    elif source.kind == "npy":
        x = source.array
        for pm, dcfg in zip(models, cfgs):
            want = tuple(dcfg["input_size"][1:])
            if tuple(x.shape[2:]) != want:
                raise ConfigError("data", f"{path}: images are {x.shape[2]}x{x.shape[3]} but model {pm.label} "
                                          f"expects {want[0]}x{want[1]}")
        dataset = RepeatTensor(x, len(models))
        desc = {"kind": "npy", "path": str(Path(path).resolve()), "shape": list(x.shape)}
    else:
        files = source.files
        dataset = MultiTransformImages(files, transforms)
        desc = {"kind": "folder", "path": str(Path(path).resolve()), "first_file": str(files[0]),
                "last_file": str(files[-1])}
    desc["transforms"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()} for c in cfgs]
    batching: dict[str, Any] = {"batch_size": cfg.batch_size, "shuffle": False}
    if plan is not None:
        batching = {"batch_sampler": plan.indices()}
    loader = DataLoader(dataset, num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"),
                        persistent_workers=False, **batching)
    return loader, len(dataset), desc


def _synthetic_image(ds, i: int):
    """Item i of a SyntheticImages set, without its label (a module-level function: picklable for workers)."""
    return ds[i][0]


Finish = Callable[[ProbeResult, dict[str, Any]], None]


def run_probe(cfg: ProbeConfig, finish: Finish | None = None) -> tuple[ProbeResult, dict[str, Any]]:
    """Build the models, stream the data through them, save metrics.json (and replicates.npz) in `cfg.out`.

    `cfg.out` is locked (`mimlab.utils.lock`, rank 0 holds it) from after the input checks until the run ends, so
    a second run into the same directory fails at once. The tables, figures and report.html (`cfg.report`) are
    written by the layer above (`mimlab.report.write_probe_report`): `finish(result, paths)` runs on rank 0 after
    metrics.json is saved, still under the lock (`mimlab probe` writes its report there)."""
    source = check_inputs(cfg)
    from mimlab.engine.dist import launch_rank

    if not cfg.out or launch_rank() != 0:
        return _run_probe(cfg, source, finish)
    from mimlab.utils.lock import run_lock

    with run_lock(cfg.out, verb="mimlab probe"):
        return _run_probe(cfg, source, finish)


def check_inputs(cfg: ProbeConfig) -> DataSource:
    """Every check that needs no model: device, data, model specs, counts. Returns the data source."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{cfg.device}: CUDA is not available on this machine")
    if not cfg.data:
        raise ConfigError("data", "is required: an image folder, a .npy array or builtin[:KIND]")
    if is_builtin(cfg.data):
        parse_data_spec(cfg.data, defaults={})          # its grammar, before building models
    elif not Path(cfg.data).exists():                   # fail before building models
        raise ConfigError("data", f"{cfg.data}: no such file or directory")
    model_specs(cfg)                                    # names, labels, checkpoints present
    source = data_source(cfg)                           # counts and lists the data before building models
    check_counts(cfg, source.count)
    return source


def _run_probe(cfg: ProbeConfig, source: DataSource, finish: Finish | None) -> tuple[ProbeResult, dict[str, Any]]:
    from mimlab.engine.dist import setup_distributed, teardown_distributed

    info = setup_distributed(cfg.device)              # torchrun's or SLURM's variables; one process without them
    try:
        plan = None
        if info.distributed:
            from mimlab.probe.distributed import BatchPlan

            plan = BatchPlan.make(source.count, cfg.batch_size, info.rank, info.world_size)
            cfg = dataclasses.replace(cfg, device=str(info.device), progress=cfg.progress and info.is_main)
        torch.manual_seed(cfg.seed)
        models = build_models(cfg, quiet=not info.is_main)
        for pm in models:
            if pm.random_init and info.is_main:
                print(f"WARNING: {pm.label} has no checkpoint: RANDOM INITIALISATION (seed {cfg.seed}); "
                      "its numbers describe an untrained network", file=sys.stderr)
        loader, n, desc = make_batches(cfg, models, source, plan)
        result = probe_pass(models, loader, cfg, num_images=n, dist=info)
        result.provenance["data"] = desc
        result.provenance["processes"] = {"world_size": info.world_size, "backend": info.backend,
                                          "batches": "round-robin" if info.distributed else "all"}
        result.rank = info.rank
        paths: dict[str, Any] = {}
        if cfg.out and info.is_main:                   # only rank 0 writes
            paths = result.save(cfg.out)
        if finish is not None and info.is_main:
            finish(result, paths)
        return result, paths
    finally:
        teardown_distributed(info)


def summary_lines(result: ProbeResult) -> list[str]:
    """A compact terminal summary: per model, per layer means of the main metrics."""
    lines = []
    for label, m in result.models.items():
        u = m.get("uniform_distance_px")
        uni = f"uniform distance {u:.2f} px" if u is not None else "uniform distance per window (see layers)"
        lines.append(f"{label}  ({m['arch']}, {m['num_prefix_tokens']} prefix, grid {m['grid'][0]}x{m['grid'][1]}, "
                     f"{uni}{', RANDOM INIT' if m['random_init'] else ''})")
        lines.append("  layer  dist_px  dist_norm   head_kl    head_js  entropy  prefix       nmi")
        for i, layer in enumerate(m["layers"]):
            mm = layer["layer_mean"]
            lines.append(f"  {i:5d}  {mm['attention_distance_px']:7.2f}  {mm['attention_distance_norm']:9.3f}  "
                         f"{mm['head_kl']:8.3g}  {mm['head_js']:9.3g}  {mm['entropy']:7.3f}  "
                         f"{mm['prefix_mass']:6.3f}  {mm['nmi']:8.3g}")
    return lines
