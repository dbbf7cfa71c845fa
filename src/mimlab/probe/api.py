"""`probe(...)`: one streaming pass over the images through every model, statistics accumulated in float64.

Per batch and model: the model runs its normal forward (fused attention); `capture` hands each block's (q, k, bias)
to `_ModelProbe.on_attention`, which turns them into per-image, per-head statistics chunk by chunk (no attention map
outlives its chunk); block outputs become float64 Gram matrices for CKA. After every model has seen the batch, the
per-image values go into streaming means with a shared Poisson bootstrap, and the Grams into minibatch HSIC.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from mimlab.errors import MimlabError
from mimlab.probe.accumulate import StreamingMean, percentile_ci
from mimlab.probe.attention_stats import METRICS, ChunkSums, attention_logits, chunk_sums, finalize_image_stats
from mimlab.probe.capture import CaptureError, SDPACall, capture_attention
from mimlab.probe.capture import capture_softmax
from mimlab.probe.families import per_image_window_mean
from mimlab.probe.cka import MinibatchCKA, gram_linear

CKA_FEATURES = ("flatten", "mean", "cls")
# centred features whose norm is below this fraction of the raw features' are rounding noise: the set has no
# variance (float32 features are centred in float32, whose rounding noise is ~1e-7 of the offset)
ZERO_VARIANCE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def feature_gram(feats: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """The linear Gram matrix (float64) of one batch's CKA features (n, ...), after subtracting the batch mean.

    The unbiased HSIC is exactly invariant to adding one vector to every sample, so centring changes nothing
    mathematically; it keeps float64 precision when features have a large common offset (residual streams do),
    where `X X^T` would bury the between-image differences under the offset's square. By the same invariance the
    mean need not be exact: float32 features are centred in float32 (no float64 copy of the raw features), and
    only the centred values, exact to float32 rounding of themselves, are multiplied in float64. Features identical
    for every image of the batch give an all-zero Gram: their HSIC is exactly 0, so CKA with them is 0/0 = NaN
    (undefined) rather than a ratio of rounding errors. Non-finite features give a non-finite Gram.

    `kernel=True` computes the same with the fused C kernel (`cpu_stats.cpu_feature_gram`) for float32 CPU features:
    one pass over the features, no float32 and float64 copies (~3x faster for ViT-S block outputs)."""
    x = feats.reshape(feats.shape[0], -1)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if kernel and x.dtype == torch.float32 and x.device.type == "cpu":
        from mimlab.probe.cpu_stats import cpu_feature_gram

        g, musq = cpu_feature_gram(x)
    else:
        mu = x.mean(0, keepdim=True)
        xc = (x - mu).to(torch.float64)
        g = xc @ xc.T
        musq = mu.to(torch.float64).square().sum()
    # ||x||^2 = ||x - mu||^2 + n ||mu||^2: the zero-variance test costs no extra pass over the features
    centred = g.diagonal().sum()
    total = centred + x.shape[0] * musq
    if bool(centred <= ZERO_VARIANCE_RTOL[x.dtype] ** 2 * total):     # also False for NaN: then g is returned
        return torch.zeros_like(g)
    return g


@dataclass
class ProbeConfig:
    """Every convention of the metrics is a parameter (defaults as in docs/metrics.md)."""

    renormalize: bool = True          # drop prefix keys and renormalise patch attention rows
    kl_eps: float = 1e-8              # eps inside the log of the KL divergence
    nmi_norm: str = "geometric"       # I / sqrt(H(Q) H(K)), or "arithmetic": I / ((H(Q)+H(K))/2)
    cka: bool = True
    cka_features: str = "flatten"     # block output flattened over tokens | mean of patch tokens | first prefix token
    bootstrap: int = 200              # Poisson bootstrap replicates for CIs (0 = none)
    ci_level: float = 0.95
    stats_dtype: str = "float32"      # dtype of the per-chunk attention math; sums are always float64
    chunk_elements: int = 1 << 22     # max logits elements per chunk (memory bound of the attention statistics)
    js: bool = True                   # Jensen-Shannon head diversity (the costliest statistic: all pairs of heads)
    compile: bool = False             # torch.compile the statistics kernel (fused loops; pays a one-off compile)
    kernel: str = "auto"              # "auto": fused Triton kernel on CUDA, fused C kernel on the CPU (float32
    #                                   statistics) when available, else torch; or force "torch", "triton", "cpu"
    seed: int = 0

    def validate(self) -> None:
        if self.cka_features not in CKA_FEATURES:
            raise MimlabError(f"--cka-features must be one of {', '.join(CKA_FEATURES)}, not '{self.cka_features}'")
        if self.stats_dtype not in ("float32", "float64"):
            raise MimlabError(f"stats dtype must be float32 or float64, not '{self.stats_dtype}'")
        if self.kernel not in ("auto", "torch", "triton", "cpu"):
            raise MimlabError(f"--stats-kernel must be auto, torch, triton or cpu, not '{self.kernel}'")
        if self.nmi_norm not in ("geometric", "arithmetic"):
            raise MimlabError(f"--nmi-norm must be geometric or arithmetic, not '{self.nmi_norm}'")
        if self.bootstrap < 0:
            raise MimlabError("--bootstrap must be >= 0")


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


_KERNEL = None


def _compiled_kernel():
    global _KERNEL
    if _KERNEL is None:
        from mimlab.probe.attention_stats import chunk_sums_tensors

        _KERNEL = torch.compile(chunk_sums_tensors, dynamic=False)
    return _KERNEL


class _ModelProbe:
    """Per-model state: family adapter (layers, geometry, capture), accumulators, this batch's buffers."""

    def __init__(self, pm: ProbeModel, cfg: ProbeConfig, device: torch.device):
        from mimlab.probe.families import adapter_for

        self.pm = pm
        self.cfg = cfg
        self.model = pm.model
        self.adapter = adapter_for(self.model)
        self.layers = self.adapter.layers
        self.attn = [(layer.name, layer.module) for layer in self.layers]
        self.blocks = self.adapter.blocks
        self.index = {name: i for i, (name, _) in enumerate(self.attn)}
        self.num_heads = [int(getattr(m, "num_heads", 0)) for _, m in self.attn]
        self.dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32
        self.dists = [layer.dist.to(device=device, dtype=self.dtype) for layer in self.layers]
        self.means: list[StreamingMean | None] = [None] * len(self.attn)
        self.batch_values: list[torch.Tensor | None] = [None] * len(self.attn)
        self.batch_grams: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.max_rowsum_err = 0.0
        self.kernel = _compiled_kernel() if cfg.compile else None
        self.kernel_name = "torch-compiled" if cfg.compile else "torch"
        self.kernels_used: set[str] = set()            # which implementation computed the statistics (provenance)
        if (self.kernel is None and torch.device(device).type == "cpu" and self.dtype == torch.float32
                and cfg.kernel in ("auto", "cpu")):
            from mimlab.probe import cpu_stats

            if cpu_stats.is_available():
                self.kernel = cpu_stats.cpu_chunk_sums_tensors
                self.kernel_name = "cpu"
            elif cfg.kernel == "cpu":
                raise MimlabError(f"--stats-kernel cpu: the fused CPU kernel is unavailable "
                                  f"({cpu_stats.unavailable_reason()})")
        elif cfg.kernel == "cpu":
            raise MimlabError("--stats-kernel cpu needs the CPU, float32 statistics and no --compile")
        # the CKA Grams through the C kernel wherever the statistics may use it (not with --stats-kernel torch)
        self.gram_kernel = False
        if torch.device(device).type == "cpu" and cfg.kernel in ("auto", "cpu"):
            from mimlab.probe import cpu_stats

            self.gram_kernel = cpu_stats.is_available()
        if cfg.cka_features == "cls" and self.adapter.num_prefix == 0:
            raise MimlabError(f"{pm.label}: --cka-features cls needs a prefix token; this model has none")

    # -- attention ------------------------------------------------------------------------------------------
    def on_attention(self, name: str, call) -> None:
        # the model may run under autocast (bf16/fp16): the statistics must not, or their matmuls would be bf16
        t = call.q if isinstance(call, SDPACall) else call.logits
        with torch.autocast(t.device.type, enabled=False):
            self._on_attention(name, call)

    def _on_attention(self, name: str, call) -> None:
        li = self.index[name]
        layer = self.layers[li]
        sdpa = isinstance(call, SDPACall)
        q = call.q if sdpa else call.logits
        if q.dim() != 4:
            what = "q" if sdpa else "softmaxed logits"
            raise CaptureError(f"{self.pm.label}/{name}: expected {what} of shape (B, H, N, .), got {tuple(q.shape)}")
        B, H, N, _ = q.shape
        nk = call.k.shape[-2] if sdpa else call.logits.shape[-1]
        P = layer.num_prefix
        if N != layer.num_tokens or nk != N:
            if layer.geometry is None:
                raise CaptureError(
                    f"{self.pm.label}/{name}: attention sees {N} queries x {nk} keys but the inspected layout is "
                    f"{P} prefix + {self.adapter.info['grid'][0]}x{self.adapter.info['grid'][1]} patches = "
                    f"{layer.num_tokens} tokens")
            g = layer.geometry
            raise CaptureError(f"{self.pm.label}/{name}: attention sees {N} queries x {nk} keys but the block's "
                               f"window is {g.window[0]}x{g.window[1]} = {g.window_area} tokens")
        nw = layer.num_windows
        if B % nw:
            raise CaptureError(f"{self.pm.label}/{name}: attention batch {B} is not a multiple of the "
                               f"{nw} windows per image")
        if sdpa:
            mask = call.attn_mask
            if mask is not None:
                while mask.dim() < 4:
                    mask = mask.unsqueeze(0)
            qd, kd = q.to(self.dtype), call.k.to(self.dtype)
        nq_total = N - P
        per_image = H * nq_total * N
        b_chunk = max(1, self.cfg.chunk_elements // max(per_image, 1))
        q_chunk = nq_total if b_chunk > 1 or per_image <= self.cfg.chunk_elements else \
            max(1, self.cfg.chunk_elements // (H * N))
        dist = self.dists[li]
        fused, fused_kernel = None, None
        if sdpa:
            fused = self._fused_sums(name, call, mask, P, dist)
            fused_kernel = "triton"
            if fused is None:
                fused = self._cpu_qk_sums(name, call, qd, kd, mask, P, dist, layer)
                fused_kernel = "cpu"
        if fused is not None:
            values = [self._values(name, fused, nq_total, layer)]
            self.kernels_used.add(fused_kernel)
        else:
            values = []
            self.kernels_used.add(self.kernel_name)
        for b0 in range(0, B if fused is None else 0, b_chunk):
            b1 = min(B, b0 + b_chunk)
            sums: ChunkSums | None = None
            for q0 in range(P, N, q_chunk):
                q1 = min(N, q0 + q_chunk)
                if sdpa:
                    m = None
                    if mask is not None:
                        m = mask[b0:b1] if mask.shape[0] == B else mask
                        m = m[..., q0:q1, :]
                    logits = attention_logits(qd[b0:b1, :, q0:q1], kd[b0:b1], m, call.scale, call.is_causal, q0)
                else:
                    logits = call.logits[b0:b1, :, q0:q1].to(self.dtype)
                if layer.geometry is None:
                    dist_rows = dist[q0 - P:q1 - P]
                else:   # window w of image b is attention batch b * nW + w
                    win = torch.arange(b0, b1, device=dist.device) % nw
                    dist_rows = dist[win][:, None, q0:q1, :]
                try:
                    part = chunk_sums(logits, num_prefix=P, dist_rows=dist_rows,
                                      eps=self.cfg.kl_eps, renormalize=self.cfg.renormalize, js=self.cfg.js,
                                      kernel=self.kernel)
                except FloatingPointError as e:
                    raise MimlabError(f"{self.pm.label}/{name}: {e}") from None
                if sums is None:
                    sums = part
                else:
                    sums += part
            assert sums is not None
            values.append(self._values(name, sums, nq_total, layer))
        out = torch.cat(values, 0)
        if nw > 1:   # per window -> mean over the windows of each image
            out = per_image_window_mean(out, nw)
        self.batch_values[li] = out

    def _values(self, name: str, sums: ChunkSums, nq_total: int, layer) -> torch.Tensor:
        """Per-image, per-head metric values (b, H, M) from the sums of complete images (or windows)."""
        err = float(sums.rowsum_err)
        self.max_rowsum_err = max(self.max_rowsum_err, err)
        if not err <= 1e-3:
            raise CaptureError(f"{self.pm.label}/{name}: captured attention rows do not sum to 1 "
                               f"(max error {err:.2e})")
        vals = finalize_image_stats(sums, nq_total, layer.uniform, self.cfg.nmi_norm)
        if not self.cfg.js:   # not computed: say so, never a silent 0
            vals["head_js"] = torch.full_like(vals["head_js"], float("nan"))
        return torch.stack([vals[m_] for m_ in METRICS], dim=-1)

    def _fused_sums(self, name: str, call, mask, P: int, dist) -> ChunkSums | None:
        """The fused Triton kernel (CUDA, float32 statistics) when configured and applicable, else None."""
        want = self.cfg.kernel
        if want == "torch" or self.dtype != torch.float32 or call.is_causal or not call.q.is_cuda:
            if want == "triton":
                raise MimlabError("--stats-kernel triton needs CUDA, float32 statistics and non-causal attention")
            return None
        from mimlab.probe import triton_stats

        if not triton_stats.is_available(call.q.device):
            if want == "triton":
                raise MimlabError("--stats-kernel triton: Triton is not available here")
            return None
        try:
            out = triton_stats.fused_chunk_stats(call.q, call.k, mask, call.scale, P, dist, eps=self.cfg.kl_eps,
                                                 js=self.cfg.js, renormalize=self.cfg.renormalize)
        except triton_stats.UnsupportedStatsShape:
            if want == "triton":
                raise
            return None
        except Exception as e:  # a kernel that fails to compile here must not cost the run: fall back, loudly
            if want == "triton":
                raise
            import warnings

            warnings.warn(f"fused Triton statistics failed ({type(e).__name__}: {str(e)[:200]}); "
                          "using the torch path for the rest of this run")
            self.cfg.kernel = "torch"
            return None
        if not bool(out[8]):
            raise MimlabError(f"{self.pm.label}/{name}: non-finite attention logits (NaN or inf)")
        return ChunkSums(*out[:8])

    def _cpu_qk_sums(self, name: str, call, qd, kd, mask, P: int, dist, layer) -> ChunkSums | None:
        """The fused C kernel straight from q and k (no logits tensor) when it is the statistics kernel and the call
        has no causal or boolean mask, else None (the caller forms the logits)."""
        if (self.kernel_name != "cpu" or call.is_causal or (mask is not None and mask.dtype == torch.bool)
                or qd.shape != kd.shape):
            return None
        from mimlab.probe import cpu_stats

        if layer.geometry is None:
            dist_rows = dist
        else:   # window w of image b is attention batch b * nW + w
            win = torch.arange(qd.shape[0], device=dist.device) % layer.num_windows
            dist_rows = dist[win][:, None]
        out = cpu_stats.cpu_qk_sums_tensors(qd, kd, mask, call.scale, P, dist_rows, self.cfg.kl_eps,
                                            self.cfg.renormalize, self.cfg.js)
        if not bool(out[8]):
            raise MimlabError(f"{self.pm.label}/{name}: non-finite attention logits (NaN or inf)")
        return ChunkSums(*out[:8])

    # -- CKA features -----------------------------------------------------------------------------------------
    def block_hook(self, index: int):
        def hook(module, args, output):
            x = self.adapter.tokens(output)
            if self.cfg.cka and self.cfg.cka_features == "flatten":
                gram = feature_gram(x, self.gram_kernel)   # non-finite iff x has a NaN/inf: no separate pass over x
                finite = bool(torch.isfinite(gram).all())
            else:                               # one reduction; the exact test only when it is not finite
                gram = None
                finite = bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
            if not finite:
                raise MimlabError(f"{self.pm.label}: non-finite values (NaN/inf) in the output of {self.blocks[index][0]}")
            if not self.cfg.cka:
                return
            if gram is None:
                P = self.adapter.num_prefix
                feats = x[:, P:].mean(1) if self.cfg.cka_features == "mean" else x[:, 0]
                gram = feature_gram(feats, self.gram_kernel)
            self.batch_grams[index] = gram
        return hook

    # -- per batch ----------------------------------------------------------------------------------------------
    def run_batch(self, x: torch.Tensor, weights: torch.Tensor | None, autocast: torch.autocast | None) -> None:
        self.batch_values = [None] * len(self.attn)
        self.batch_grams = [None] * len(self.blocks)
        handles = [m.register_forward_hook(self.block_hook(i)) for i, (_, m) in enumerate(self.blocks)]
        try:
            capture = capture_attention if self.adapter.capture == "sdpa" else capture_softmax
            with capture(self.attn, self.on_attention):
                if autocast is not None:
                    with autocast:
                        self.adapter.forward(x)
                else:
                    self.adapter.forward(x)
        finally:
            for h in handles:
                h.remove()
        missing = [self.attn[i][0] for i, v in enumerate(self.batch_values) if v is None]
        if missing:
            raise CaptureError(f"{self.pm.label}: no attention captured for {', '.join(missing)}")
        for li, v in enumerate(self.batch_values):
            if self.means[li] is None:
                self.means[li] = StreamingMean(tuple(v.shape[1:]), bootstrap=self.cfg.bootstrap, seed=self.cfg.seed)
                self.num_heads[li] = v.shape[1]
            self.means[li].update(v, weights)

    # -- result -------------------------------------------------------------------------------------------------
    def layer_replicates(self) -> torch.Tensor | None:
        """(R, L, M) bootstrap replicates of each layer's mean over heads, or None without bootstrap."""
        reps = [acc.replicate_means() for acc in self.means]
        if any(r is None for r in reps):
            return None
        return torch.stack([r.mean(1) for r in reps], dim=1)

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for li, (name, _) in enumerate(self.attn):
            acc = self.means[li]
            mean = acc.mean()                                  # (H, M)
            layer = self.layers[li]
            entry: dict[str, Any] = {"name": name, "stage": layer.stage, "num_heads": int(mean.shape[0])}
            if layer.geometry is not None:
                entry["window"] = layer.geometry.to_dict()
                entry["uniform_distance_px"] = layer.uniform
            for mi, metric in enumerate(METRICS):
                entry[metric] = mean[:, mi].tolist()
            entry["layer_mean"] = {metric: float(mean[:, mi].mean()) for mi, metric in enumerate(METRICS)}
            reps = acc.replicate_means()
            if reps is not None and reps.shape[0] >= 2:
                lo, hi = percentile_ci(reps, self.cfg.ci_level)          # (H, M)
                llo, lhi = percentile_ci(reps.mean(1), self.cfg.ci_level)  # (M,)
                entry["ci"] = {metric: {"low": lo[:, mi].tolist(), "high": hi[:, mi].tolist()}
                               for mi, metric in enumerate(METRICS)}
                entry["layer_ci"] = {metric: [float(llo[mi]), float(lhi[mi])] for mi, metric in enumerate(METRICS)}
            layers.append(entry)
        pm = self.pm
        out = {"arch": pm.arch or type(self.model).__name__, "checkpoint": pm.checkpoint,
               "checkpoint_sha256": pm.checkpoint_sha256, "random_init": bool(pm.random_init),
               "family": self.adapter.family, **self.adapter.info,
               "uniform_distance_px": self.adapter.uniform_distance(),
               "max_rowsum_error": self.max_rowsum_err, "stats_kernel": "+".join(sorted(self.kernels_used)),
               "layers": layers}
        out.update(pm.extra)
        return out


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

    def to_dict(self) -> dict[str, Any]:
        import mimlab

        cfg = self.config
        return {
            "mimlab_version": mimlab.__version__,
            "num_images": self.num_images,
            "seed": cfg.seed,
            "config": {"renormalize_patch_attention": cfg.renormalize, "kl_eps": cfg.kl_eps, "log": "natural",
                       "js": cfg.js, "compiled_stats": cfg.compile,
                       "nmi_norm": cfg.nmi_norm, "bootstrap": cfg.bootstrap, "ci_level": cfg.ci_level,
                       "stats_dtype": cfg.stats_dtype, "ci_method": "poisson_bootstrap_percentile"},
            "models": self.models,
            "cka": self.cka,
            "cka_config": self.cka_info,
            "seconds": self.seconds,
            "provenance": self.provenance,
        }

    def save(self, out_dir, *, report: bool = True) -> dict[str, Any]:
        """Write metrics.json (+ tables, figures and report.html when `report`) into out_dir; return the paths."""
        from pathlib import Path

        from mimlab.utils.io import atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        atomic_write_json(out / "metrics.json", data)
        paths: dict[str, Any] = {"metrics": out / "metrics.json"}
        if self.replicates:
            import numpy as np

            from mimlab.utils.io import atomic_path

            with atomic_path(out / "replicates.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **{k: v.numpy() for k, v in self.replicates.items()})
            paths["replicates"] = out / "replicates.npz"
        if report:
            from mimlab.report.html import render_all

            paths.update(render_all(data, out))
        return paths


def _as_probe_models(models) -> list[ProbeModel]:
    if isinstance(models, Mapping):
        models = [ProbeModel(label=str(k), model=v) if not isinstance(v, ProbeModel) else v for k, v in models.items()]
    out = list(models)
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise MimlabError(f"model labels must be unique, got {labels}")
    if not out:
        raise MimlabError("no models to probe")
    return out


def _batches(images, batch_size: int, num_models: int) -> Iterable[tuple[torch.Tensor, ...]]:
    """Tensor (N,3,H,W) -> consecutive chunks (shared by all models); an iterable yields its own batches.

    A MimlabError raised while a DataLoader worker reads the data (an unreadable image) arrives with the worker's
    traceback in its message; it is re-raised with the original one-line message."""
    if isinstance(images, torch.Tensor):
        for i in range(0, images.shape[0], batch_size):
            yield (images[i:i + batch_size],) * num_models
        return
    from mimlab.data.images import clean_worker_message

    it = iter(images)
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
        yield tuple(batch)


@torch.inference_mode()
def probe(models: Mapping[str, nn.Module] | Sequence[ProbeModel], images, *, batch_size: int = 32,
          device: str | torch.device = "cpu", seed: int = 0, cka: bool = True, bootstrap: int = 200,
          precision: str = "fp32", config: ProbeConfig | None = None, num_images: int | None = None,
          progress: bool = False) -> ProbeResult:
    """Probe every model on the same images in the same order.

    `images`: a tensor (N, 3, H, W), already normalised, shared by all models; or an iterable of batches, each a
    tuple with one tensor per model (in model order), as built by `mimlab.probe.run` from an image folder.
    CKA minibatches are the consecutive batches in that order (unbiased HSIC needs >= 4 images per batch; a
    smaller last batch is left out of CKA and reported in `cka_config`).
    """
    cfg = config or ProbeConfig(cka=cka, bootstrap=bootstrap, seed=seed)
    cfg.validate()
    dev = torch.device(device)
    pms = _as_probe_models(models)
    probes = []
    for pm in pms:
        pm.model.eval().to(dev)
        probes.append(_ModelProbe(pm, cfg, dev))
    autocast = None
    if precision in ("bf16", "fp16"):
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    elif precision != "fp32":
        raise MimlabError(f"--precision must be fp32, bf16 or fp16, not '{precision}'")
    total = num_images if num_images is not None else (images.shape[0] if isinstance(images, torch.Tensor) else None)
    layer_counts = [len(p.blocks) for p in probes]
    cka_acc = MinibatchCKA(sum(layer_counts)) if cfg.cka else None
    weight_gen = StreamingMean((1,), bootstrap=cfg.bootstrap, seed=cfg.seed + 1) if cfg.bootstrap else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="probe", dynamic_ncols=True)
    seen = 0
    t0 = time.perf_counter()
    # tiny probabilities are denormal floats, which are 10-100x slower on x86; they contribute < 1e-38 anyway
    flushed = dev.type == "cpu" and torch.set_flush_denormal(True)
    try:
        for batch in _batches(images, batch_size, len(probes)):
            if len(batch) != len(probes):
                raise MimlabError(f"each batch must hold one tensor per model ({len(probes)}), got {len(batch)}")
            b = batch[0].shape[0]
            weights = weight_gen.draw_weights(b) if weight_gen is not None else None
            for p, x in zip(probes, batch):
                x = x.to(dev, non_blocking=True)
                # one reduction per batch, on the device: NaN input must not be blamed on the model's first layer
                if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                    raise MimlabError(f"input images {seen}..{seen + b - 1} (for model {p.pm.label}) hold NaN or inf "
                                      "values; the probe needs finite, normalised pixels")
                p.run_batch(x, weights, autocast)
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
    if seen == 0:
        raise MimlabError("no images to probe")
    seconds = time.perf_counter() - t0
    cka_out: dict[str, list[list[float]]] = {}
    cka_info: dict[str, Any] = {"enabled": cfg.cka}
    if cka_acc is not None:
        if cka_acc.num_batches == 0:
            raise MimlabError(f"CKA needs a batch of at least 4 images (got {seen} image(s) with batch size "
                              f"{batch_size}); use more images or --no-cka")
        full = cka_acc.result()
        offsets = [0]
        for c in layer_counts:
            offsets.append(offsets[-1] + c)
        for i, pa in enumerate(probes):
            for j, pb in enumerate(probes):
                blk = full[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]]
                cka_out[f"{pa.pm.label}/{pb.pm.label}"] = blk.tolist()
        cka_info.update({"features": cfg.cka_features, "batch_size": batch_size, "num_batches": cka_acc.num_batches,
                         "num_images": cka_acc.num_samples, "images_left_out": cka_acc.skipped_samples,
                         "estimator": "unbiased_minibatch", "dtype": "float64",
                         "gram_kernel": "cpu" if any(p.gram_kernel for p in probes) else "torch"})
    models_out = {p.pm.label: p.to_dict() for p in probes}
    reps = {p.pm.label: p.layer_replicates() for p in probes}
    from mimlab.utils.provenance import provenance

    return ProbeResult(num_images=seen, config=cfg, models=models_out, cka=cka_out, cka_info=cka_info,
                       seconds=seconds, provenance=provenance(device=str(dev), precision=precision),
                       replicates={k: v for k, v in reps.items() if v is not None})


def images_per_second(result: ProbeResult) -> float:
    return result.num_images / result.seconds if result.seconds > 0 else math.inf
