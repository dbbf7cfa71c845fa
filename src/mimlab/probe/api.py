"""`probe(models, images, config)`: one streaming pass over the images through every model, statistics in float64.

Every model sees the same images in the same order (so cross-model CKA is meaningful and bootstrap differences
between models are paired). Per batch and model, `ModelProbe` captures each block's attention and turns it into
per-image statistics with the backend `select_backend` picked; after every model has seen the batch, the per-image
values go into streaming means with a shared Poisson bootstrap and the block-output Grams into minibatch HSIC.
`mimlab.probe.run.run_probe` is the verb around it: models from specs, images from a folder, outputs on disk.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn

from mimlab.engine.dist import DistInfo
from mimlab.errors import ConfigError, MimlabError, clean_worker_message
from mimlab.models.checkpoints import FORMATS as CHECKPOINT_FORMATS
from mimlab.probe.accumulate import StreamingMean
from mimlab.probe.backends import KERNELS, select_backend
from mimlab.probe.cka import MinibatchCKA
from mimlab.probe.model_probe import ModelProbe

CKA_FEATURES = ("flatten", "mean", "cls")
PRECISIONS = ("fp32", "bf16", "fp16")
STATS_DTYPES = ("float32", "float64")
NMI_NORMS = ("geometric", "arithmetic")


@dataclass(frozen=True)
class ProbeConfig:
    """Everything `mimlab probe` depends on, validated when built and never changed afterwards.

    The first group describes a job for `run_probe` (models named by spec, images from `data`, outputs in `out`);
    `probe()`, which takes models and images as arguments, uses only the other fields. Every convention of the
    metrics is a parameter (defaults as in docs/metrics.md)."""

    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"out", "workers", "report", "progress"})

    # the job (run_probe)
    models: tuple[str, ...] = ()          # "[LABEL=]ARCH[@CHECKPOINT]" or "[LABEL=]hf:DIR"
    data: str = ""                        # image folder | .npy | builtin[:KIND]
    images: int | str | None = None       # the first N images; "all"; None: the first 256 (all, if fewer)
    model_kwargs: tuple[str, ...] = ()    # "k=v,..." once for all models, or once per model
    checkpoint_format: str = "auto"
    out: str | None = None
    workers: int = 2                      # data loader worker processes
    report: bool = True                   # tables, figures and report.html beside metrics.json
    img_size: tuple[int, int] | None = None   # build timm models for this input size (default: their own)
    resize_pos_embed: bool = False        # resample a checkpoint's position embedding of another grid
    # how the pass runs
    batch_size: int = 32                  # images per batch = CKA minibatch (the only owner of that size)
    device: str = "cpu"
    precision: str = "fp32"               # autocast of the forward; the statistics are always float32/64
    seed: int = 0                         # random init of checkpoint-less models, bootstrap weights
    progress: bool = False
    # metric conventions
    renormalize: bool = True              # drop prefix keys and renormalise patch attention rows
    kl_eps: float = 1e-8                  # eps inside the log of the KL divergence
    nmi_norm: str = "geometric"           # I / sqrt(H(Q) H(K)), or "arithmetic": I / ((H(Q)+H(K))/2)
    js: bool = True                       # Jensen-Shannon head diversity (the costliest statistic)
    cka: bool = True
    cka_features: str = "flatten"         # block output flattened over tokens | mean of patch tokens | first prefix
    bootstrap: int = 200                  # Poisson bootstrap replicates for CIs (0 = none)
    ci_level: float = 0.95
    norm_outlier_k: float = 3.0           # high-norm patch tokens: norm > k x the image's median (token_norms)
    maps: int = 0                         # attention maps and rollout of the first N images (attention_maps)
    map_queries: tuple[tuple[int, int], ...] = ()   # patch queries (row, col) of the maps; default the centre
    # numerics (the same numbers, to float32 rounding, whatever is chosen)
    stats_dtype: str = "float32"          # dtype of the per-chunk attention math; sums are always float64
    chunk_elements: int = 1 << 22         # max logits per chunk on the torch path (memory bound)
    kernel: str = "auto"                  # statistics backend: auto | torch | triton | cpu (mimlab.probe.backends)
    compile: bool = False                 # torch.compile the torch path (a one-off compile per shape)

    def __post_init__(self) -> None:
        if self.img_size is not None:
            size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
            if len(size) != 2 or not all(isinstance(v, int) and v >= 1 for v in size):
                raise ConfigError("img_size", f"must be N or (H, W) with positive integers, got {self.img_size!r}")
            object.__setattr__(self, "img_size", size)
        object.__setattr__(self, "map_queries", tuple(tuple(int(v) for v in q) for q in self.map_queries))
        if any(len(q) != 2 for q in self.map_queries):
            raise ConfigError("map_queries", f"must be (row, col) pairs, got {self.map_queries!r}")
        for name in ("models", "model_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigError(name, f"must be a sequence of strings, not the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        choices = {"cka_features": CKA_FEATURES, "precision": PRECISIONS, "stats_dtype": STATS_DTYPES,
                   "nmi_norm": NMI_NORMS, "kernel": KERNELS, "checkpoint_format": CHECKPOINT_FORMATS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {', '.join(allowed)}, not '{getattr(self, name)}'")
        for name, low in (("batch_size", 1), ("workers", 0), ("bootstrap", 0), ("chunk_elements", 1), ("maps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
        if self.images not in (None, "all") and (not isinstance(self.images, int) or isinstance(self.images, bool)
                                                 or self.images < 1):
            raise ConfigError("images", f"must be an integer >= 1 or 'all', got {self.images!r}")
        if not (isinstance(self.kl_eps, (int, float)) and 0 < self.kl_eps < 1):
            raise ConfigError("kl_eps", f"must be in (0, 1), got {self.kl_eps!r}")
        if not (isinstance(self.norm_outlier_k, (int, float)) and self.norm_outlier_k > 1):
            raise ConfigError("norm_outlier_k", f"must be a number > 1, got {self.norm_outlier_k!r}")
        if not (isinstance(self.ci_level, (int, float)) and 0 < self.ci_level < 1):
            raise ConfigError("ci_level", f"must be in (0, 1), got {self.ci_level!r}")
        if len(self.model_kwargs) not in (0, 1, max(1, len(self.models))):
            raise ConfigError("model_kwargs", f"give it once (for all models) or once per model "
                                              f"({len(self.models)}), not {len(self.model_kwargs)} times")

    def replace(self, **changes: Any) -> "ProbeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def metrics_config(self) -> dict[str, Any]:
        """The conventions as metrics.json records them."""
        return {"renormalize_patch_attention": self.renormalize, "kl_eps": self.kl_eps, "log": "natural",
                "js": self.js, "compiled_stats": self.compile, "nmi_norm": self.nmi_norm,
                "bootstrap": self.bootstrap, "ci_level": self.ci_level, "stats_dtype": self.stats_dtype,
                "ci_method": "poisson_bootstrap_percentile", "norm_outlier_k": self.norm_outlier_k}


@dataclass
class ProbeModel:
    """A model to probe plus what the output should say about it."""

    label: str
    model: nn.Module
    arch: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    random_init: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeResult:
    num_images: int
    config: ProbeConfig
    models: dict[str, dict[str, Any]]
    cka: dict[str, list[list[float]]]
    cka_info: dict[str, Any]
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)
    # label -> (R, L, M) bootstrap replicates of the layer means (mean over heads), METRICS order. The replicate
    # weights are shared by all models of a run, so differences between models are paired.
    replicates: dict[str, torch.Tensor] = field(default_factory=dict)
    # label -> attention rows and rollout of the first `config.maps` images (`attention_maps.AttentionMaps.result`)
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank: int = 0                         # this process's rank in a multi-process run (only rank 0 writes)

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        import mimlab

        return {
            "mimlab_version": mimlab.__version__,
            "num_images": self.num_images,
            "seed": self.config.seed,
            "config": self.config.metrics_config(),
            "models": self.models,
            "cka": self.cka,
            "cka_config": self.cka_info,
            "seconds": self.seconds,
            "provenance": self.provenance,
        }

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write metrics.json (and replicates.npz with a bootstrap) into out_dir; return the paths. The tables,
        figures and report.html are `mimlab.report.write_probe_report`'s."""
        from mimlab.utils.io import atomic_path, atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "metrics.json", self.to_dict())
        paths: dict[str, Path] = {"metrics": out / "metrics.json"}
        if self.replicates:
            import numpy as np

            with atomic_path(out / "replicates.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **{k: v.numpy() for k, v in self.replicates.items()})
            paths["replicates"] = out / "replicates.npz"
        if self.maps:
            import numpy as np

            from mimlab.utils.io import atomic_write_json

            arrays = {f"{label}/{k}": v for label, m in self.maps.items() for k, v in m.items()
                      if isinstance(v, np.ndarray)}
            with atomic_path(out / "maps.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)
            atomic_write_json(out / "maps.json", {label: {k: v for k, v in m.items() if not isinstance(v, np.ndarray)}
                                                  for label, m in self.maps.items()})
            paths["maps"] = out / "maps.npz"
        return paths


def _as_probe_models(models) -> list[ProbeModel]:
    if isinstance(models, Mapping):
        models = [ProbeModel(label=str(k), model=v) if not isinstance(v, ProbeModel) else v for k, v in models.items()]
    out = list(models)
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise ConfigError("models", f"labels must be unique, got {labels}")
    if not out:
        raise ConfigError("models", "names no model to probe")
    return out


def _batches(images, batch_size: int, num_models: int) -> Iterable[tuple[torch.Tensor, ...]]:
    """Tensor (N,3,H,W) -> consecutive chunks of `batch_size` (shared by all models); an iterable yields its own
    batches, which must hold `batch_size` images each (the last may hold fewer): the config owns that size.

    A MimlabError raised while a DataLoader worker reads the data (an unreadable image) arrives with the worker's
    traceback in its message; it is re-raised with the original one-line message."""
    if isinstance(images, torch.Tensor):
        for i in range(0, images.shape[0], batch_size):
            yield (images[i:i + batch_size],) * num_models
        return
    it = iter(images)
    short = None
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except MimlabError as e:
            # stop the loader's worker processes now: left to the garbage collector, their shutdown stalls ~5 s
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise MimlabError(clean_worker_message(e)) from None
        if isinstance(batch, torch.Tensor):
            batch = (batch,) * num_models
        b = batch[0].shape[0]
        if short is not None or b > batch_size:
            raise ConfigError("batch_size", f"is {batch_size}, but the images came in batches of {short or b}: "
                                            "every batch but the last must hold batch_size images")
        if b < batch_size:
            short = b
        yield tuple(batch)


def probe(models: Mapping[str, nn.Module] | Sequence[ProbeModel], images, config: ProbeConfig | None = None, *,
          num_images: int | None = None, **options: Any) -> ProbeResult:
    """Probe every model on the same images in the same order.

    `images`: a tensor (N, 3, H, W), already normalised, shared by all models; or an iterable of batches, each a
    tensor or a tuple with one tensor per model (in model order), as `mimlab.probe.run` builds from an image folder.
    How: `config`, or its fields as keyword arguments (`probe(models, x, batch_size=8, bootstrap=0)`), not both.
    CKA minibatches are the consecutive batches (unbiased HSIC needs >= 4 images per batch; a smaller last batch is
    left out of CKA and reported in `cka_config`). `num_images` (for the progress bar) is the number of images an
    iterable will yield.
    """
    if config is not None and options:
        raise ConfigError("config", f"is given together with keyword options ({', '.join(sorted(options))}): pass "
                                    "one ProbeConfig, or its fields as keywords, not both")
    cfg = config if config is not None else ProbeConfig(**options)
    if cfg.models or cfg.data:
        raise ConfigError("config", "names models or data, which describe a job for run_probe; probe() takes the "
                                    "models and the images as arguments")
    return probe_pass(models, images, cfg, num_images=num_images)


def check_counts(cfg: ProbeConfig, num_images: int | None) -> None:
    """The checks a known number of images allows, made before any forward pass."""
    if num_images is None:
        return
    if num_images < 1:
        raise ConfigError("images", "is 0: there is nothing to probe")
    if cfg.cka:
        full, last = divmod(num_images, cfg.batch_size)
        if not ((full and cfg.batch_size >= 4) or last >= 4):
            raise ConfigError("batch_size", f"{cfg.batch_size} with {num_images} image(s) leaves CKA no minibatch of "
                                            "at least 4 images (unbiased HSIC needs 4): use more images or a larger "
                                            "batch, or turn CKA off (cka=False, --no-cka)")
    if cfg.maps > num_images:
        raise ConfigError("maps", f"{cfg.maps} asks for the maps of more images than the run has ({num_images})")


@torch.inference_mode()
def probe_pass(models, images, cfg: ProbeConfig, *, num_images: int | None = None,
               dist: DistInfo | None = None) -> ProbeResult:
    """`probe` without its argument checks (`run_probe` passes its job config).

    `dist` (several processes, `mimlab.probe.distributed`): `images` is then this rank's batches only (a tensor
    holds the whole run and is cut here), and `num_images` the whole run's count."""
    total = num_images if num_images is not None else (images.shape[0] if isinstance(images, torch.Tensor) else None)
    check_counts(cfg, total)
    plan = None
    if dist is not None and dist.distributed:
        from mimlab.probe.distributed import BatchPlan

        if total is None:
            raise ConfigError("num_images", "is needed to split the images across processes")
        plan = BatchPlan.make(total, cfg.batch_size, dist.rank, dist.world_size)
        if isinstance(images, torch.Tensor):
            images = [images[plan.offsets[b]:plan.offsets[b] + plan.sizes[b]] for b in plan.mine]
    dev = torch.device(cfg.device)
    pms = _as_probe_models(models)
    probes = []
    for pm in pms:
        pm.model.eval().to(dev)
        backend = select_backend(cfg.kernel, dev, cfg.stats_dtype, cfg.compile, eps=cfg.kl_eps,
                                 renormalize=cfg.renormalize, js=cfg.js, chunk_elements=cfg.chunk_elements)
        probes.append(ModelProbe(pm, cfg, backend, dev))
    autocast = None
    if cfg.precision in ("bf16", "fp16"):
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
    layer_counts = [len(p.blocks) for p in probes]
    cka_acc = MinibatchCKA(sum(layer_counts)) if cfg.cka else None
    weight_gen = StreamingMean((1,), bootstrap=cfg.bootstrap, seed=cfg.seed + 1) if cfg.bootstrap else None
    bar = None
    if cfg.progress and (plan is None or dist.is_main):
        from tqdm.auto import tqdm

        share = total if plan is None else sum(plan.sizes[g] for g in plan.mine)
        bar = tqdm(total=share, unit="img", dynamic_ncols=True,
                   desc="probe" if plan is None else f"probe (rank 0 of {dist.world_size})")
    seen = 0
    t0 = time.perf_counter()
    # tiny probabilities are denormal floats, which are 10-100x slower on x86; they contribute < 1e-38 anyway
    flushed = dev.type == "cpu" and torch.set_flush_denormal(True)
    try:
        drawn = 0                                       # global batches whose bootstrap weights are drawn
        for i, batch in enumerate(_batches(images, cfg.batch_size, len(probes))):
            if len(batch) != len(probes):
                raise MimlabError(f"each batch must hold one tensor per model ({len(probes)}), got {len(batch)}")
            b = batch[0].shape[0]
            offset = seen
            if plan is not None:                        # other ranks' batches: draw (and drop) their weights
                g = plan.mine[i]
                offset = plan.offsets[g]
                if b != plan.sizes[g]:
                    raise MimlabError(f"batch {g} holds {b} images, the plan {plan.sizes[g]}")
                for skipped in range(drawn, g):
                    if weight_gen is not None:
                        weight_gen.draw_weights(plan.sizes[skipped])
                drawn = g + 1
            weights = weight_gen.draw_weights(b) if weight_gen is not None else None
            for p, x in zip(probes, batch):
                x = x.to(dev, non_blocking=True)
                # one reduction per batch, on the device: NaN input must not be blamed on the model's first layer
                if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                    raise MimlabError(f"input images {seen}..{seen + b - 1} (for model {p.pm.label}) hold NaN or inf "
                                      "values; the probe needs finite, normalised pixels")
                p.run_batch(x, weights, autocast, offset)
            if cka_acc is not None:
                cka_acc.update(torch.cat([torch.stack(p.batch_grams) for p in probes], 0))
            seen += b
            if bar is not None:
                bar.update(b)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if plan is not None:
        from mimlab.probe.distributed import reduce_probes

        if seen != sum(plan.sizes[g] for g in plan.mine):
            raise MimlabError(f"rank {dist.rank} probed {seen} images, its share of the plan is "
                              f"{sum(plan.sizes[g] for g in plan.mine)}")
        reduce_probes(probes, cka_acc, dist)
        seen = total
    if seen == 0:
        raise MimlabError("no images to probe")
    cka_out, cka_info = _cka_result(cka_acc, probes, layer_counts, cfg, seen)
    models_out = {p.pm.label: p.to_dict() for p in probes}
    reps = {p.pm.label: p.layer_replicates() for p in probes}
    from mimlab.utils.provenance import provenance

    maps = {p.pm.label: p.maps.result() for p in probes if p.maps is not None}
    return ProbeResult(num_images=seen, config=cfg, models=models_out, cka=cka_out, cka_info=cka_info,
                       seconds=seconds, provenance=provenance(device=str(dev), precision=cfg.precision),
                       replicates={k: v for k, v in reps.items() if v is not None},
                       maps={k: v for k, v in maps.items() if v})


def _cka_result(cka_acc: MinibatchCKA | None, probes: list[ModelProbe], layer_counts: list[int], cfg: ProbeConfig,
                seen: int) -> tuple[dict[str, list[list[float]]], dict[str, Any]]:
    """CKA between every pair of models' layers ('a/b' -> rows: a's layers, columns: b's) and how it was made."""
    cka_out: dict[str, list[list[float]]] = {}
    cka_info: dict[str, Any] = {"enabled": cfg.cka}
    if cka_acc is None:
        return cka_out, cka_info
    if cka_acc.num_batches == 0:
        raise MimlabError(f"CKA needs a batch of at least 4 images (got {seen} image(s) in batches of "
                          f"{cfg.batch_size}); use more images or a larger batch, or turn CKA off")
    full = cka_acc.result()
    offsets = [0]
    for c in layer_counts:
        offsets.append(offsets[-1] + c)
    for i, pa in enumerate(probes):
        for j, pb in enumerate(probes):
            blk = full[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
            cka_out[f"{pa.pm.label}/{pb.pm.label}"] = blk.tolist()
    cka_info.update({"features": cfg.cka_features, "batch_size": cfg.batch_size, "num_batches": cka_acc.num_batches,
                     "num_images": cka_acc.num_samples, "images_left_out": cka_acc.skipped_samples,
                     "estimator": "unbiased_minibatch", "dtype": "float64",
                     "gram_kernel": "cpu" if any(p.backend.gram_name == "cpu" for p in probes) else "torch"})
    return cka_out, cka_info


def images_per_second(result: ProbeResult) -> float:
    return result.images_per_second
