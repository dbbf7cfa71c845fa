"""From command-line style inputs (model specs, a data path) to a saved probe result. Mirrors `mimlab probe`."""
from __future__ import annotations

import sys
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mimlab.errors import MimlabError
from mimlab.models.factory import ModelSpec, create_model, parse_model_kwargs, parse_model_spec
from mimlab.probe.api import ProbeConfig, ProbeModel, ProbeResult, probe

BUILTIN_PREFIX = "builtin"
HF_PREFIX = "hf:"


@dataclass
class ProbeRequest:
    models: Sequence[str]                         # "[LABEL=]ARCH[@CHECKPOINT]"
    data: str                                     # image folder | .npy | builtin[:KIND]
    images: int | None = 256                      # first N images (None = all)
    batch_size: int = 32
    out: str | None = None
    device: str = "cpu"
    seed: int = 0
    model_kwargs: Sequence[str] = ()              # one string for all models, or one per model
    checkpoint_format: str = "auto"
    precision: str = "fp32"
    workers: int = 2
    config: ProbeConfig = field(default_factory=ProbeConfig)
    report: bool = True
    progress: bool = True


def _specs(req: ProbeRequest) -> list[ModelSpec]:
    if not req.models:
        raise MimlabError("name at least one MODEL ([LABEL=]ARCH[@CHECKPOINT])")
    kw = list(req.model_kwargs or [])
    if len(kw) not in (0, 1, len(req.models)):
        raise MimlabError(f"--model-kwargs: give it once (for all models) or once per model "
                          f"({len(req.models)}), not {len(kw)} times")
    per_model = [parse_model_kwargs(kw[0] if len(kw) == 1 else kw[i]) if kw else {} for i in range(len(req.models))]
    specs = [parse_model_spec(m, per_model[i]) for i, m in enumerate(req.models)]
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise MimlabError(f"duplicate model label(s) {', '.join(dup)}: name them, e.g. a=ARCH@CKPT b=ARCH@CKPT")
    for s in specs:
        if s.arch.startswith(HF_PREFIX):
            if s.checkpoint is not None:
                raise MimlabError(f"{s.label}: hf:PATH models load their weights from PATH; drop '@{s.checkpoint}'")
            if s.kwargs:
                raise MimlabError(f"{s.label}: --model-kwargs do not apply to hf:PATH models (their config.json "
                                  "defines them)")
            if s.label == s.arch:    # default label: the directory name (a label may not contain '/')
                s.label = HF_PREFIX + (Path(s.arch[len(HF_PREFIX):]).name or "model")
            continue
        if s.checkpoint is not None and not Path(s.checkpoint).exists():
            raise MimlabError(f"{s.label}: checkpoint {s.checkpoint} does not exist")
    return specs


def build_models(req: ProbeRequest) -> list[ProbeModel]:
    out = []
    for spec in _specs(req):
        if spec.arch.startswith(HF_PREFIX):
            from mimlab.models.hf import load_hf_model

            path = spec.arch[len(HF_PREFIX):]
            model, info = load_hf_model(path)
            out.append(ProbeModel(label=spec.label, model=model, arch=spec.arch, checkpoint=str(Path(path).resolve()),
                                  random_init=False, extra=info))
            continue
        model, report = create_model(spec.arch, spec.kwargs, checkpoint=spec.checkpoint,
                                     checkpoint_format=req.checkpoint_format)
        extra: dict[str, Any] = {"model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in spec.kwargs.items()}}
        if report is not None:
            extra["checkpoint_format"] = report.format
            if report.dropped:
                extra["checkpoint_dropped_keys"] = report.dropped
        out.append(ProbeModel(label=spec.label, model=model, arch=spec.arch, checkpoint=spec.checkpoint,
                              checkpoint_sha256=report.sha256 if report is not None else None,
                              random_init=spec.checkpoint is None, extra=extra))
    return out


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


def make_batches(req: ProbeRequest, models: Sequence[ProbeModel]):
    """Return (iterable of batches with one tensor per model, number of images, data description)."""
    from torch.utils.data import DataLoader

    from mimlab.data.images import MultiTransformImages, RepeatTensor, list_images, load_npy

    n = req.images
    if n is not None and n < 1:
        raise MimlabError(f"--images must be >= 1, got {n}")
    path = req.data
    transforms, cfgs = zip(*(_transform_for(pm.model) for pm in models))
    if path == BUILTIN_PREFIX or path.startswith(BUILTIN_PREFIX + ":"):
        from mimlab.data.synthetic import DEFAULT_KIND, KINDS, SyntheticImages

        kind = path.split(":", 1)[1] if ":" in path else DEFAULT_KIND
        if kind not in KINDS:
            raise MimlabError(f"--data builtin:{kind}: unknown kind; choose from {', '.join(KINDS)}")
        count = n or 256
        classes = min(count, 16)
        size = max(max(c["input_size"][1:]) for c in cfgs)
        # held-out images: indices far from any training set made with the defaults
        ds = SyntheticImages(kind, classes=classes, per_class=-(-count // classes), size=size, seed=req.seed,
                             offset=1_000_000)
        dataset = MultiTransformImages(range(count), transforms, load=partial(_synthetic_image, ds))
        desc = {"kind": "builtin", "generator": kind, "classes": classes, "size": size, "offset": 1_000_000}
    elif path.endswith(".npy"):
        x = load_npy(path)
        if n is not None and n > x.shape[0]:
            raise MimlabError(f"--images {n}: {path} holds only {x.shape[0]} images")
        x = x[: n or x.shape[0]]
        for pm, cfg in zip(models, cfgs):
            want = tuple(cfg["input_size"][1:])
            if tuple(x.shape[2:]) != want:
                raise MimlabError(f"--data {path}: images are {x.shape[2]}x{x.shape[3]} but model {pm.label} "
                                  f"expects {want[0]}x{want[1]}")
        dataset = RepeatTensor(x, len(models))
        desc = {"kind": "npy", "path": str(Path(path).resolve()), "shape": list(x.shape)}
    else:
        files = list_images(path)
        if n is not None and n > len(files):
            raise MimlabError(f"--images {n}: {path} holds only {len(files)} images")
        files = files[: n or len(files)]
        dataset = MultiTransformImages(files, transforms)
        desc = {"kind": "folder", "path": str(Path(path).resolve()), "first_file": str(files[0]),
                "last_file": str(files[-1])}
    desc["transforms"] = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()} for c in cfgs]
    loader = DataLoader(dataset, batch_size=req.batch_size, shuffle=False, num_workers=req.workers,
                        pin_memory=req.device.startswith("cuda"), persistent_workers=False)
    return loader, len(dataset), desc


def _synthetic_image(ds, i: int):
    """Item i of a SyntheticImages set, without its label (a module-level function: picklable for workers)."""
    return ds[i][0]


def run_probe(req: ProbeRequest) -> tuple[ProbeResult, dict[str, Any]]:
    """Build the models, stream the data through them, save metrics.json + tables + figures + report.html."""
    if req.batch_size < 1:
        raise MimlabError(f"--batch-size must be >= 1, got {req.batch_size}")
    if req.device.startswith("cuda") and not torch.cuda.is_available():
        raise MimlabError(f"--device {req.device}: CUDA is not available on this machine")
    is_builtin = req.data == BUILTIN_PREFIX or req.data.startswith(BUILTIN_PREFIX + ":")
    if not is_builtin and not Path(req.data).exists():   # fail before building models
        raise MimlabError(f"--data {req.data}: no such file or directory")
    torch.manual_seed(req.seed)
    models = build_models(req)
    for pm in models:
        if pm.random_init:
            print(f"WARNING: {pm.label} has no checkpoint: RANDOM INITIALISATION (seed {req.seed}); "
                  "its numbers describe an untrained network", file=sys.stderr)
    loader, n, desc = make_batches(req, models)
    cfg = req.config
    cfg.seed = req.seed
    result = probe(models, loader, batch_size=req.batch_size, device=req.device, precision=req.precision,
                   config=cfg, num_images=n, progress=req.progress)
    result.provenance["data"] = desc
    paths: dict[str, Any] = {}
    if req.out:
        paths = result.save(req.out, report=req.report)
    return result, paths


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
