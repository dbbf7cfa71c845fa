"""Where the attention statistics are computed. One selection function, `select_backend`, and one result type, the
`ChunkSums` of `mimlab.probe.attention_stats` (the definition, in torch): every backend computes the same sums.

- `torch`: the definition chunk by chunk (`torch_stats`), eager or compiled with torch.compile (`compile=True`);
  float32 or float64; any device. The reference every other backend is tested against.
- `cpu`: the fused C kernel (`cpu_kernel`), float32 on the CPU, from q and k without forming logits; with its C
  CKA Gram. The default on the CPU (benchmarks/RESULTS.md: 1.17x a plain forward of ViT-S/16, vs 1.49x compiled
  torch and 2.11x eager torch).
- `triton`: the fused Triton kernel (`triton_kernel`), float32 on CUDA, from q and k (the default on CUDA).

A backend is made per model probe (it records which kernels actually ran, for provenance) and exposes
`qk_sums` (what a block hands to fused attention), `logits_sums` (logits captured at a softmax) and `gram`
(the CKA Gram of one batch's features).
"""
from __future__ import annotations

import torch

from mimlab.errors import ConfigError
from mimlab.probe.attention_stats import ChunkSums
from mimlab.probe.backends.torch_stats import chunked_sums, compiled_chunk_sums, feature_gram, window_dist_rows
from mimlab.probe.attention_stats import chunk_sums_tensors

KERNELS = ("auto", "torch", "triton", "cpu")


class StatsBackend:
    """The torch path (eager or compiled); the fused backends override what they accelerate."""

    def __init__(self, *, dtype: torch.dtype, eps: float, renormalize: bool, js: bool, chunk_elements: int,
                 compiled: bool = False, c_gram: bool = False):
        self.dtype, self.eps, self.renormalize, self.js = dtype, eps, renormalize, js
        self.chunk_elements = chunk_elements
        self.torch_fn = compiled_chunk_sums() if compiled else chunk_sums_tensors
        self.torch_name = "torch-compiled" if compiled else "torch"
        self.gram_kernel = None
        if c_gram:
            from mimlab.probe.backends import cpu_kernel

            self.gram_kernel = cpu_kernel.feature_gram_parts
        self.used: set[str] = set()             # kernels that computed statistics so far (provenance)

    @property
    def gram_name(self) -> str:
        return "cpu" if self.gram_kernel is not None else "torch"

    def _chunked(self, fn, **kw) -> ChunkSums:
        return chunked_sums(fn, dtype=self.dtype, eps=self.eps, renormalize=self.renormalize, js=self.js,
                            chunk_elements=self.chunk_elements, **kw)

    def qk_sums(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool,
                num_prefix: int, dist: torch.Tensor, num_windows: int) -> ChunkSums:
        """Sums for the logits `scale q k^T + mask` (SDPA's arguments, q and k (B, H, N, d)); `dist` (K, K), or
        (W, N, N) per window with attention-batch item b in window b % W."""
        self.used.add(self.torch_name)
        return self._chunked(self.torch_fn, q=q, k=k, mask=mask, scale=scale, is_causal=is_causal,
                             num_prefix=num_prefix, dist=dist, num_windows=num_windows)

    def logits_sums(self, logits: torch.Tensor, num_prefix: int, dist: torch.Tensor, num_windows: int) -> ChunkSums:
        """Sums for captured logits (B, H, N, N)."""
        self.used.add(self.torch_name)
        return self._chunked(self.torch_fn, logits=logits, num_prefix=num_prefix, dist=dist, num_windows=num_windows)

    def gram(self, feats: torch.Tensor) -> torch.Tensor:
        return feature_gram(feats, self.gram_kernel)


class CpuBackend(StatsBackend):
    """The fused C kernel for float32 statistics on the CPU; causal or boolean masks go through logits, in C."""

    def __init__(self, **kw):
        super().__init__(c_gram=True, **kw)
        from mimlab.probe.backends import cpu_kernel

        self.kernel = cpu_kernel

    def qk_sums(self, q, k, mask, scale, is_causal, num_prefix, dist, num_windows):
        if mask is not None:
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
        if is_causal or (mask is not None and mask.dtype == torch.bool) or q.shape != k.shape:
            return self._logits_in_c(q=q, k=k, mask=mask, scale=scale, is_causal=is_causal, num_prefix=num_prefix,
                                     dist=dist, num_windows=num_windows)
        self.used.add("cpu")
        d = dist.to(self.dtype)
        rows = d if num_windows == 1 else window_dist_rows(d, 0, q.shape[0], num_windows)
        return self.kernel.qk_sums(q.to(self.dtype), k.to(self.dtype), mask, scale, num_prefix, rows, self.eps,
                                   self.renormalize, self.js)

    def logits_sums(self, logits, num_prefix, dist, num_windows):
        return self._logits_in_c(logits=logits, num_prefix=num_prefix, dist=dist, num_windows=num_windows)

    def _logits_in_c(self, **kw) -> ChunkSums:
        self.used.add("cpu")
        return self._chunked(self.kernel.logits_sums, **kw)


class TritonBackend(StatsBackend):
    """The fused Triton kernel for SDPA calls on CUDA (float32 statistics); captured logits, causal attention and
    shapes the kernel does not take go through torch. `strict` (kernel="triton" asked for by name): those are errors.
    A kernel that fails to run in `auto` mode is reported once and the torch path used for the rest of the run."""

    def __init__(self, strict: bool, **kw):
        super().__init__(**kw)
        from mimlab.probe.backends import triton_kernel

        self.kernel = triton_kernel
        self.strict = strict
        self.failed = False

    def qk_sums(self, q, k, mask, scale, is_causal, num_prefix, dist, num_windows):
        if is_causal or not q.is_cuda or self.failed:
            if self.strict:
                raise ConfigError("kernel", "triton needs CUDA, float32 statistics and non-causal attention")
            return super().qk_sums(q, k, mask, scale, is_causal, num_prefix, dist, num_windows)
        if mask is not None:
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
        try:
            out = self.kernel.fused_chunk_stats(q, k, mask, scale, num_prefix, dist.to(torch.float32), eps=self.eps,
                                                js=self.js, renormalize=self.renormalize)
        except self.kernel.UnsupportedStatsShape:
            if self.strict:
                raise
            return super().qk_sums(q, k, mask, scale, is_causal, num_prefix, dist, num_windows)
        except Exception as e:  # a kernel that fails to compile here must not cost the run: fall back, loudly
            if self.strict:
                raise
            import warnings

            warnings.warn(f"fused Triton statistics failed ({type(e).__name__}: {str(e)[:200]}); "
                          "using the torch path for the rest of this run")
            self.failed = True
            return super().qk_sums(q, k, mask, scale, is_causal, num_prefix, dist, num_windows)
        self.used.add("triton")
        return out


def select_backend(kernel: str, device: str | torch.device, stats_dtype: str, compile: bool, *, eps: float,
                   renormalize: bool, js: bool, chunk_elements: int) -> StatsBackend:
    """The backend for a probe run: `kernel` "torch", "cpu" or "triton" by name (an error if it cannot run here),
    or "auto": Triton on CUDA, the C kernel on the CPU (float32 statistics, no torch.compile; if it cannot be built,
    the torch path with a one-line note), torch otherwise."""
    if kernel not in KERNELS:
        raise ConfigError("kernel", f"must be one of {', '.join(KERNELS)}, not '{kernel}'")
    dev = torch.device(device)
    f32 = stats_dtype == "float32"
    kw = dict(dtype=torch.float64 if stats_dtype == "float64" else torch.float32, eps=eps, renormalize=renormalize,
              js=js, chunk_elements=chunk_elements)
    from mimlab.probe.backends import cpu_kernel

    if kernel == "cpu":
        if dev.type != "cpu" or not f32 or compile:
            raise ConfigError("kernel", "cpu needs the CPU, float32 statistics and no compile")
        if not cpu_kernel.is_available():
            raise ConfigError("kernel", f"cpu: the fused CPU kernel is unavailable ({cpu_kernel.unavailable_reason()})")
        return CpuBackend(**kw)
    if kernel == "triton":
        from mimlab.probe.backends import triton_kernel

        if dev.type != "cuda" or not f32:
            raise ConfigError("kernel", "triton needs CUDA, float32 statistics and non-causal attention")
        if not triton_kernel.is_available(dev):
            raise ConfigError("kernel", "triton: Triton is not available here")
        return TritonBackend(strict=True, compiled=compile, **kw)
    c_gram = dev.type == "cpu" and kernel == "auto" and cpu_kernel.is_available()
    if kernel == "auto" and f32:
        if dev.type == "cuda":
            from mimlab.probe.backends import triton_kernel

            if triton_kernel.is_available(dev):
                return TritonBackend(strict=False, compiled=compile, **kw)
        elif dev.type == "cpu" and not compile:
            if cpu_kernel.is_available():
                return CpuBackend(**kw)
            cpu_kernel.note_unavailable()
    return StatsBackend(compiled=compile, c_gram=c_gram, **kw)


__all__ = ["KERNELS", "StatsBackend", "CpuBackend", "TritonBackend", "select_backend", "feature_gram"]
