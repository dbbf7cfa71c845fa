"""One model under the probe: its adapter, statistics backend and accumulators, and what one batch leaves behind.

Per batch: the model runs its normal forward (fused attention); `capture` hands each block's (q, k, bias) or
logits to `on_attention`, whose backend turns them into per-image, per-head sums (no attention map outlives its
chunk) that `image_values` finalises; block outputs become float64 Gram matrices for CKA (`block_hook`). Then the
per-image values go into streaming means that share the run's bootstrap weights (`accumulate`).
"""
from __future__ import annotations

from typing import Any

import torch

from mimlab.errors import ConfigError, MimlabError
from mimlab.probe.accumulate import StreamingMean, percentile_ci
from mimlab.probe.attention_maps import AttentionMaps
from mimlab.probe.attention_stats import METRICS, ChunkSums, finalize_image_stats
from mimlab.probe.backends import StatsBackend
from mimlab.probe.capture import CaptureError, SDPACall, capture_attention, capture_softmax
from mimlab.probe.families import AttentionLayer, ModelAdapter, adapter_for, per_image_window_mean
from mimlab.probe.token_norms import TokenNormStats

MAX_ROWSUM_ERROR = 1e-3     # captured rows must be probability distributions: anything else is not attention
ROLE_METRICS = {"cls": "cls_mass", "dist": "dist_mass", "register": "register_mass"}   # prefix mass by token role


class ModelProbe:
    """Per-model state of a probe run (`api.probe` makes one per model; `cfg` is its frozen `ProbeConfig`)."""

    def __init__(self, pm, cfg, backend: StatsBackend, device: torch.device):
        self.pm = pm
        self.cfg = cfg
        self.backend = backend
        self.adapter: ModelAdapter = adapter_for(pm.model)
        self.layers: list[AttentionLayer] = self.adapter.layers
        self.index = {layer.name: i for i, layer in enumerate(self.layers)}
        self.dists = [layer.dist.to(device=device, dtype=backend.dtype) for layer in self.layers]
        self.means: list[StreamingMean | None] = [None] * len(self.layers)
        self.batch_values: list[torch.Tensor | None] = [None] * len(self.layers)
        self.batch_grams: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.max_rowsum_err = 0.0
        self.roles = tuple(self.adapter.info.get("prefix_roles") or ())
        self.norms = [TokenNormStats(self.adapter.num_prefix, self._block_grid(i), cfg.norm_outlier_k)
                      for i in range(len(self.blocks))]
        self.maps: AttentionMaps | None = None
        if cfg.maps and all(layer.geometry is None for layer in self.layers):
            try:
                self.maps = AttentionMaps(cfg.maps, self.adapter.num_prefix, tuple(self.adapter.info["grid"]),
                                          len(self.layers), cfg.map_queries, self.roles)
            except ValueError as e:
                raise ConfigError("map_queries", f"{pm.label}: {e}") from None
        if cfg.cka_features == "cls" and self.adapter.num_prefix == 0:
            raise ConfigError("cka_features", f"cls needs a prefix token; {pm.label} has none")

    @property
    def blocks(self) -> list[tuple[str, torch.nn.Module]]:
        return self.adapter.blocks

    def _block_grid(self, i: int) -> tuple[int, int]:
        """The token map a block outputs: the model's patch grid, or a Swin stage's map."""
        if len(self.layers) == len(self.blocks) and self.layers[i].geometry is not None:
            return tuple(self.layers[i].geometry.feat)
        return tuple(self.adapter.info["grid"])

    # -- attention ------------------------------------------------------------------------------------------
    def on_attention(self, name: str, call) -> None:
        # the model may run under autocast (bf16/fp16): the statistics must not, or their matmuls would be bf16
        t = call.q if isinstance(call, SDPACall) else call.logits
        with torch.autocast(t.device.type, enabled=False):
            li = self.index[name]
            self.batch_values[li] = self.layer_values(self.layers[li], self.dists[li], call)
            if self.maps is not None:
                self.maps.on_attention(li, call)

    def _check_shape(self, layer: AttentionLayer, call) -> None:
        sdpa = isinstance(call, SDPACall)
        q = call.q if sdpa else call.logits
        if q.dim() != 4:
            what = "q" if sdpa else "softmaxed logits"
            raise CaptureError(f"{self.pm.label}/{layer.name}: expected {what} of shape (B, H, N, .), "
                               f"got {tuple(q.shape)}")
        B, _, N, _ = q.shape
        nk = call.k.shape[-2] if sdpa else call.logits.shape[-1]
        if N != layer.num_tokens or nk != N:
            if layer.geometry is None:
                grid = self.adapter.info["grid"]
                raise CaptureError(
                    f"{self.pm.label}/{layer.name}: attention sees {N} queries x {nk} keys but the inspected layout "
                    f"is {layer.num_prefix} prefix + {grid[0]}x{grid[1]} patches = {layer.num_tokens} tokens")
            g = layer.geometry
            raise CaptureError(f"{self.pm.label}/{layer.name}: attention sees {N} queries x {nk} keys but the "
                               f"block's window is {g.window[0]}x{g.window[1]} = {g.window_area} tokens")
        if B % layer.num_windows:
            raise CaptureError(f"{self.pm.label}/{layer.name}: attention batch {B} is not a multiple of the "
                               f"{layer.num_windows} windows per image")

    def layer_values(self, layer: AttentionLayer, dist: torch.Tensor, call) -> torch.Tensor:
        """Per-image, per-head metric values (B, H, M) of one captured attention call (window means for Swin)."""
        self._check_shape(layer, call)
        if isinstance(call, SDPACall):
            sums = self.backend.qk_sums(call.q, call.k, call.attn_mask, call.scale, call.is_causal, layer.num_prefix,
                                        dist, layer.num_windows)
        else:
            sums = self.backend.logits_sums(call.logits, layer.num_prefix, dist, layer.num_windows)
        values = self.image_values(layer, sums)
        return per_image_window_mean(values, layer.num_windows) if layer.num_windows > 1 else values

    def image_values(self, layer: AttentionLayer, sums: ChunkSums) -> torch.Tensor:
        """Per-image (or per-window), per-head values (b, H, M) from the sums over all queries of each."""
        if not bool(sums.finite):
            raise MimlabError(f"{self.pm.label}/{layer.name}: non-finite attention logits (NaN or inf)")
        err = float(sums.rowsum_err)
        self.max_rowsum_err = max(self.max_rowsum_err, err)
        if not err <= MAX_ROWSUM_ERROR:
            raise CaptureError(f"{self.pm.label}/{layer.name}: captured attention rows do not sum to 1 "
                               f"(max error {err:.2e})")
        nq = layer.num_tokens - layer.num_prefix
        vals = finalize_image_stats(sums, nq, layer.uniform, self.cfg.nmi_norm)
        if not self.cfg.js:   # not computed: say so, never a silent 0
            vals["head_js"] = torch.full_like(vals["head_js"], float("nan"))
        # METRICS, then each prefix token's share of the attention (mean over the patch queries)
        return torch.cat([torch.stack([vals[m] for m in METRICS], dim=-1), sums.prefix_each / nq], dim=-1)

    # -- CKA features -----------------------------------------------------------------------------------------
    def block_hook(self, index: int):
        def hook(module, args, output):
            x = self.adapter.tokens(output)
            cka, features = self.cfg.cka, self.cfg.cka_features
            if cka and features == "flatten":
                gram = self.backend.gram(x)        # non-finite iff x has a NaN/inf: no separate pass over x
                finite = bool(torch.isfinite(gram).all())
            else:                               # one reduction; the exact test only when it is not finite
                gram = None
                finite = bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
            if not finite:
                raise MimlabError(f"{self.pm.label}: non-finite values (NaN/inf) in the output of "
                                  f"{self.blocks[index][0]}")
            self.norms[index].update(x)
            if not cka:
                return
            if gram is None:
                P = self.adapter.num_prefix
                feats = x[:, P:].mean(1) if features == "mean" else x[:, 0]
                gram = self.backend.gram(feats)
            self.batch_grams[index] = gram
        return hook

    # -- per batch ----------------------------------------------------------------------------------------------
    def run_batch(self, x: torch.Tensor, weights: torch.Tensor | None, autocast: torch.autocast | None,
                  offset: int = 0) -> None:
        """One batch whose first image is image `offset` of the run."""
        self.batch_values = [None] * len(self.layers)
        self.batch_grams = [None] * len(self.blocks)
        handles = [m.register_forward_hook(self.block_hook(i)) for i, (_, m) in enumerate(self.blocks)]
        modules = [(layer.name, layer.module) for layer in self.layers]
        if self.maps is not None:
            self.maps.start_batch(x, offset)
        try:
            capture = capture_attention if self.adapter.capture == "sdpa" else capture_softmax
            with capture(modules, self.on_attention):
                if autocast is not None:
                    with autocast:
                        self.adapter.forward(x)
                else:
                    self.adapter.forward(x)
        finally:
            for h in handles:
                h.remove()
        missing = [self.layers[i].name for i, v in enumerate(self.batch_values) if v is None]
        if missing:
            raise CaptureError(f"{self.pm.label}: no attention captured for {', '.join(missing)}")
        if self.maps is not None:
            self.maps.end_batch(x.shape[0])
        for li, v in enumerate(self.batch_values):
            if self.means[li] is None:
                self.means[li] = StreamingMean(tuple(v.shape[1:]), bootstrap=self.cfg.bootstrap, seed=self.cfg.seed)
            self.means[li].update(v, weights)

    # -- result -------------------------------------------------------------------------------------------------
    def layer_replicates(self) -> torch.Tensor | None:
        """(R, L, M) bootstrap replicates of each layer's mean over heads, or None without bootstrap."""
        reps = [acc.replicate_means() for acc in self.means]
        if any(r is None for r in reps):
            return None
        return torch.stack([r.mean(1) for r in reps], dim=1)

    def layer_entry(self, li: int) -> dict[str, Any]:
        """metrics.json's entry for layer li: per-head values, the layer mean and their bootstrap intervals."""
        layer, acc = self.layers[li], self.means[li]
        mean = acc.mean()                                  # (H, M)
        entry: dict[str, Any] = {"name": layer.name, "stage": layer.stage, "num_heads": int(mean.shape[0]),
                                 "num_patch_keys": layer.num_tokens - layer.num_prefix}   # K: entropy <= ln K
        if layer.geometry is not None:
            entry["window"] = layer.geometry.to_dict()
            entry["uniform_distance_px"] = layer.uniform
        M = len(METRICS)
        shares, reps = mean[:, M:], acc.replicate_means()
        # per-head metrics: METRICS, then the prefix mass split by role (sums of the role's tokens' shares)
        named = {metric: (mean[:, mi], None if reps is None else reps[:, :, mi]) for mi, metric in enumerate(METRICS)}
        for role, metric in ROLE_METRICS.items():
            idx = [j for j, r in enumerate(self.roles) if r == role]
            if idx:
                named[metric] = (shares[:, idx].sum(1), None if reps is None else reps[:, :, M:][:, :, idx].sum(-1))
        for metric, (values, _) in named.items():
            entry[metric] = values.tolist()
        entry["layer_mean"] = {metric: float(values.mean()) for metric, (values, _) in named.items()}
        if reps is not None and reps.shape[0] >= 2:
            entry["ci"], entry["layer_ci"] = {}, {}
            for metric, (_, r) in named.items():
                lo, hi = percentile_ci(r, self.cfg.ci_level)                 # (H,)
                llo, lhi = percentile_ci(r.mean(1), self.cfg.ci_level)      # 0-d
                entry["ci"][metric] = {"low": lo.tolist(), "high": hi.tolist()}
                entry["layer_ci"][metric] = [float(llo), float(lhi)]
        if self.roles:
            entry["prefix_tokens"] = {"roles": list(self.roles), "mass": shares.tolist()}     # (H, P)
        if li < len(self.norms) and self.norms[li].n:
            tn = self.norms[li].to_dict(self.roles)
            entry["token_norms"] = tn
            entry["layer_mean"].update(patch_norm_median=tn["patch_median"], patch_norm_max=tn["patch_max"],
                                       norm_outliers_per_image=tn["outliers_per_image"])
        return entry

    def to_dict(self) -> dict[str, Any]:
        pm = self.pm
        out = {"arch": pm.arch or type(pm.model).__name__, "checkpoint": pm.checkpoint,
               "checkpoint_sha256": pm.checkpoint_sha256, "random_init": bool(pm.random_init),
               "family": self.adapter.family, **self.adapter.info,
               "uniform_distance_px": self.adapter.uniform_distance(),
               "max_rowsum_error": self.max_rowsum_err, "stats_kernel": "+".join(sorted(self.backend.used)),
               **({"maps": "not available for window attention"} if self.cfg.maps and self.maps is None else {}),
               "layers": [self.layer_entry(li) for li in range(len(self.layers))]}
        out.update(pm.extra)
        return out
