"""Fused Triton kernel for the probe's attention statistics, without materialising attention maps.

`fused_chunk_stats(q, k, bias, scale, num_prefix, dist)` returns exactly what
`mimlab.probe.attention_stats.chunk_sums_tensors` returns for the logits `s = q k^T * scale + bias` restricted to the
patch-query rows P..N-1 (the same `ChunkSums`: shapes, dtypes and meaning), but never writes a logit or a probability to global
memory. One program takes a block of BQ patch queries of one image for ALL heads (the cross-head terms need every
head at the same (query, key)) and walks over the keys twice, recomputing q.k (flash-style):

pass 1, per head and query: the row maximum m over patch keys and R = sum_j (exp(s_j - m) - c) with
    c = exp(min_j s_j - m), online over key blocks (R rescaled when m grows and topped up when the minimum falls);
    then in float64 log sum_j exp(s_j - m) = log(K c + R) (the reference's shift trick: R is small for near-uniform
    rows, so the row normaliser keeps ~1e-9 relative precision, and its terms are never negative, so it does not
    cancel for peaked rows). The same over all N keys, with the prefix keys' exponentials summed
    directly in pass 2, gives the prefix mass
    m_i = -expm1(lse_patch - lse_all).
pass 2, per key block: lpk = log(K p) = (s - m) - (lse_rel - log K), p = exp(lpk) / K, and the sums
    sum_j p (row sum), sum_j p lpk (log K - entropy), sum_j p D (distance), sum_i p (column sums, for NMI),
    cross[h, g] = sum_{i,j} p_h ell_g with ell = log(K (p + eps)) (the KL cross terms) as one tensor-core dot of
    the (heads, BQ*BK) tiles in 3xTF32 (about float32 accuracy), and Jensen-Shannon per pair h < g:
    sum_{i,j} (p_h + p_g) g(|lpk_h - lpk_g| / 2), g(x) = x tanh x - log cosh x (see `_js_g`: no cancellation).

Per-row values go to a (5, B, H, K) float64 buffer and per-program partial sums to (B, num_query_blocks, ...)
buffers; the sums over rows and programs are taken afterwards in float64 by torch (deterministic, no atomics).
Arithmetic is float32 (inputs bf16/fp16/fp32; the q.k dot accumulates in float32, with IEEE precision for fp32
inputs, never TF32), the row normalisers float64.

On CUDA exp and log in the normalisers, p and ell come from libdevice (accurate to ~1 ulp); the Jensen-Shannon
term uses Triton's fast `tl.exp`/`tl.log` (its formula has at most ~6x cancellation, so ~1e-7 relative error is
ample). Under `TRITON_INTERPRET=1` (CPU tests) all of them are numpy's, since the interpreter has no libdevice.

Triton APIs used: `tl.dot` on 3-D blocks with `input_precision` (Triton >= 3.0), `triton.language.extra.libdevice`
(Triton >= 3.0); nothing newer.
"""
from __future__ import annotations

import math
import os

import torch

from mimlab.errors import MimlabError
from mimlab.probe.attention_stats import ChunkSums

try:  # triton is optional: the torch path works without it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    _TRITON_ERROR: str | None = None
except Exception as e:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    libdevice = None
    _TRITON_ERROR = f"{type(e).__name__}: {e}"

MAX_HEADS = 16
MAX_PREFIX = 8
HEAD_DIMS = (16, 128)
_MASKED = -1e4          # as attention_stats._MASKED: stands in for -inf logits


class UnsupportedStatsShape(MimlabError):
    """The fused kernel does not handle these inputs; the caller should use the torch path."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def is_available(device: torch.device | str | None = None) -> bool:
    """True when the kernel can run on `device`: triton importable and a CUDA device (or the CPU interpreter)."""
    if triton is None:
        return False
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cpu":
        return _interpreting() and _KERNEL_INTERPRETED
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda") and not _KERNEL_INTERPRETED


if triton is not None:

    @triton.jit
    def _exp(x, LIB: tl.constexpr):
        if LIB:
            y = libdevice.exp(x)
        else:
            y = tl.exp(x)
        return y

    @triton.jit
    def _log(x, LIB: tl.constexpr):
        if LIB:
            y = libdevice.log(x)
        else:
            y = tl.log(x)
        return y

    @triton.jit
    def _js_g(x):
        """g(x) = x tanh x - log cosh x, x >= 0: the Jensen-Shannon term of two probabilities u, v is
        u log(2u / (u + v)) + v log(2v / (u + v)) = (u + v) g(|log u - log v| / 2). g is second order at 0, so
        it is evaluated without cancellation: a Taylor series below 0.5 (truncation < 1e-8 relative), and
        log 2 - 2 x e / (1 + e) - log(1 + e) with e = exp(-2x) above (at most ~6x cancellation)."""
        x2 = x * x
        ser = x2 * (0.5 + x2 * (-0.25 + x2 * (1.0 / 9.0 + x2 * (-17.0 / 360.0 + x2 * (31.0 / 1575.0 + x2 * (
            -691.0 / 85050.0 + x2 * (10922.0 / 3274425.0 + x2 * (-929569.0 / 681080400.0))))))))
        e = tl.exp(-2.0 * tl.where(x < 0.5, 0.5, x))
        big = 0.6931471805599453 - 2.0 * x * e / (1.0 + e) - tl.log(1.0 + e)
        return tl.where(x < 0.5, ser, big)

    @triton.jit
    def _logits(q, k_ptr, bias_ptr, b, hh, rows, kb, skb, skh, skn, skd, sbb, sbh, sbn, sbm, scale, H, N, D,
                HAS_BIAS: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
        """s = clamp_min(q k^T * scale + bias, -1e4) for keys kb..kb+BK-1: (H_PAD, BQ, BK) float32."""
        cols = kb + tl.arange(0, BK)
        dd = tl.arange(0, BD)
        h3 = hh[:, None, None]
        kmask = (h3 < H) & (dd[None, :, None] < D) & (cols[None, None, :] < N)
        kt = tl.load(k_ptr + b * skb + h3 * skh + dd[None, :, None] * skd + cols[None, None, :] * skn,
                     mask=kmask, other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * scale
        if HAS_BIAS:
            bmask = (h3 < H) & (rows[None, :, None] < N) & (cols[None, None, :] < N)
            bias = tl.load(bias_ptr + b * sbb + h3 * sbh + rows[None, :, None] * sbn + cols[None, None, :] * sbm,
                           mask=bmask, other=0.0)
            s = s + bias.to(tl.float32)
        return tl.where(s < -10000.0, -10000.0, s)   # keeps NaN (flagged), maps -inf to -1e4

    @triton.jit
    def _online_update(s, ok, m, mn, r, n, LIB: tl.constexpr):
        """Add the keys `ok` of block s to (m, mn, r, n): running max m, running min mn, n keys seen and
        r = sum_j (exp(s_j - m) - exp(mn - m)) >= 0. Every term added is non-negative (the baseline is the row's
        smallest exponential, not an arbitrary key's), so r never cancels: K c + r is exact for peaked rows too."""
        bm = tl.max(tl.where(ok, s, float("-inf")), 2)
        bmn = tl.min(tl.where(ok, s, float("inf")), 2)
        m_new = tl.maximum(m, bm)
        mn_new = tl.minimum(mn, bmn)
        c_new = _exp(mn_new - m_new, LIB)
        c_old = _exp(tl.where(n > 0, mn, mn_new) - m_new, LIB)       # the old baseline at the new maximum
        e = tl.where(ok, _exp(s - m_new[:, :, None], LIB) - c_new[:, :, None], 0.0)
        r = tl.where(n > 0, r * _exp(m - m_new, LIB) + n * (c_old - c_new), 0.0) + tl.sum(e, 2)
        return m_new, mn_new, r, n + tl.sum(tl.where(ok, 1.0, 0.0), 2)

    @triton.jit
    def _stats_kernel(q_ptr, k_ptr, bias_ptr, dist_ptr, rows_ptr, cross_ptr, js_ptr, col_ptr, pe_ptr,
                      sqb, sqh, sqn, sqd, skb, skh, skn, skd, sbb, sbh, sbn, sbm, sdw, sdr, sdc,
                      B, H, N, P, K, D, QB, NW, scale, inv_k, k_eps,
                      HAS_BIAS: tl.constexpr, HAS_PREFIX: tl.constexpr, DO_JS: tl.constexpr, LIB: tl.constexpr,
                      PREC: tl.constexpr, XPREC: tl.constexpr, H_PAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                      BD: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        hh = tl.arange(0, H_PAD)
        rows = P + pid * BQ + tl.arange(0, BQ)          # token index of each query
        dd = tl.arange(0, BD)
        h3 = hh[:, None, None]
        r3 = rows[None, :, None]
        q = tl.load(q_ptr + b * sqb + h3 * sqh + r3 * sqn + dd[None, None, :] * sqd,
                    mask=(h3 < H) & (r3 < N) & (dd[None, None, :] < D), other=0.0)
        row_ok = (hh[:, None] < H) & (rows[None, :] < N)                     # (H_PAD, BQ)

        # ---- pass 1: row max and shifted exp-sums (patch keys; all keys for the prefix mass) ----
        cols = tl.arange(0, BK)
        s = _logits(q, k_ptr, bias_ptr, b, hh, rows, 0, skb, skh, skn, skd, sbb, sbh, sbn, sbm, scale, H, N, D,
                    HAS_BIAS, BK, BD, PREC)
        m = tl.full((H_PAD, BQ), float("-inf"), tl.float32)
        mn = tl.full((H_PAD, BQ), float("inf"), tl.float32)
        r = tl.zeros((H_PAD, BQ), tl.float32)
        n = tl.zeros((H_PAD, BQ), tl.float32)
        pv = (cols >= P) & (cols < N)
        m, mn, r, n = _online_update(s, pv[None, None, :], m, mn, r, n, LIB)
        bad = tl.sum(tl.where(((s != s) | (s == float("inf"))) & (cols[None, None, :] < N), 1.0, 0.0), 2)
        if HAS_PREFIX:
            ma = tl.full((H_PAD, BQ), float("-inf"), tl.float32)
            mna = tl.full((H_PAD, BQ), float("inf"), tl.float32)
            ra = tl.zeros((H_PAD, BQ), tl.float32)
            na = tl.zeros((H_PAD, BQ), tl.float32)
            ma, mna, ra, na = _online_update(s, (cols < N)[None, None, :], ma, mna, ra, na, LIB)
        for kb in range(BK, N, BK):
            cols = kb + tl.arange(0, BK)
            s = _logits(q, k_ptr, bias_ptr, b, hh, rows, kb, skb, skh, skn, skd, sbb, sbh, sbn, sbm, scale, H, N,
                        D, HAS_BIAS, BK, BD, PREC)
            ok = (cols < N)[None, None, :]
            m, mn, r, n = _online_update(s, ok, m, mn, r, n, LIB)
            bad += tl.sum(tl.where(((s != s) | (s == float("inf"))) & ok, 1.0, 0.0), 2)
            if HAS_PREFIX:
                ma, mna, ra, na = _online_update(s, ok, ma, mna, ra, na, LIB)
        # float64: log sum_j exp(s_j - m) = log(K c + R), c = exp(min_j s_j - m)
        # (log K is never a float32 scalar here: rel - log K = log(c + R / K) directly)
        c = _exp(mn - m, LIB).to(tl.float64)
        off = _log(c + r.to(tl.float64) / K, LIB).to(tl.float32)
        if HAS_PREFIX:
            ca = _exp(mna - ma, LIB).to(tl.float64)
            s_all = N * ca + ra.to(tl.float64)                                 # sum_j exp(s_j - ma), all keys

        # ---- pass 2: statistics ----
        keps = k_eps
        rowsum = tl.zeros((H_PAD, BQ), tl.float32)
        negent = tl.zeros((H_PAD, BQ), tl.float32)
        dist = tl.zeros((H_PAD, BQ), tl.float32)
        cross = tl.zeros((H_PAD, H_PAD), tl.float32)
        jsacc = tl.zeros((H_PAD, H_PAD), tl.float32)
        hr = hh[:, None]
        qrow = rows - P
        pref = tl.zeros((H_PAD, BQ), tl.float32)
        for kb in range(0, N, BK):
            cols = kb + tl.arange(0, BK)
            s = _logits(q, k_ptr, bias_ptr, b, hh, rows, kb, skb, skh, skn, skd, sbb, sbh, sbn, sbm, scale, H, N,
                        D, HAS_BIAS, BK, BD, PREC)
            if HAS_PREFIX:
                if kb == 0:   # every prefix key is in the first block (BK > P): sum their exp directly
                    pk = (cols < P)[None, None, :] & row_ok[:, :, None]
                    ex = tl.where(pk, _exp(tl.where(pk, s - ma[:, :, None], 0.0), LIB), 0.0)
                    pref = tl.sum(ex, 2)
                    # each prefix token's share, summed over this block's queries (one row of columns < P)
                    share = tl.where(pk, ex.to(tl.float64) / s_all[:, :, None], 0.0)
                    tl.store(pe_ptr + ((b * QB + pid) * H + hr) * P + cols[None, :], tl.sum(share, 1),
                             mask=(hr < H) & (cols[None, :] < P))
            pv = (cols >= P) & (cols < N)
            valid = row_ok[:, :, None] & pv[None, None, :]
            lpk = tl.where(valid, (s - m[:, :, None]) - off[:, :, None], 0.0)
            kp = _exp(lpk, LIB)                                               # K p
            p = tl.where(valid, kp * inv_k, 0.0)
            rowsum += tl.sum(p, 2)
            negent += tl.sum(p * lpk, 2)
            dmask = (rows[:, None] < N) & pv[None, :]
            dtile = tl.load(dist_ptr + (b % NW) * sdw + qrow[:, None] * sdr + (cols - P)[None, :] * sdc, mask=dmask, other=0.0)
            dist += tl.sum(p * dtile[None, :, :], 2)
            colpart = tl.sum(p, 1)                                            # (H_PAD, BK)
            tl.store(col_ptr + ((b * QB + pid) * H + hr) * K + (cols - P)[None, :], colpart,
                     mask=(hr < H) & pv[None, :])
            # ell = log(K (p + eps)); cross[h, g] += sum_{i,j} p_h ell_g as one (H, BQ*BK) x (BQ*BK, H) dot
            ell = tl.where(valid, _log(kp + keps, LIB), 0.0)
            cross += tl.dot(tl.reshape(p, (H_PAD, BQ * BK)), tl.trans(tl.reshape(ell, (H_PAD, BQ * BK))),
                            input_precision=XPREC)
            if DO_JS:
                for h in range(0, H - 1):
                    sel = h3 == h
                    ph = tl.sum(tl.where(sel, p, 0.0), 0)                     # (BQ, BK): head h
                    lh = tl.sum(tl.where(sel, lpk, 0.0), 0)
                    t = (ph[None, :, :] + p) * _js_g(0.5 * tl.abs(lh[None, :, :] - lpk))
                    t = tl.where(h3 > h, t, 0.0)
                    jrow = tl.sum(tl.sum(t, 2), 1)
                    jsacc = tl.where(hr == h, jsacc + jrow[None, :], jsacc)

        # ---- outputs ----
        plane = B * H * K
        ridx = (b * H + hr) * K + qrow[None, :]
        tl.store(rows_ptr + ridx, rowsum.to(tl.float64), mask=row_ok)
        tl.store(rows_ptr + plane + ridx, negent.to(tl.float64), mask=row_ok)
        tl.store(rows_ptr + 2 * plane + ridx, dist.to(tl.float64), mask=row_ok)
        if HAS_PREFIX:   # prefix mass summed directly, not 1 - patch mass: a small mass keeps its precision
            pmass = pref.to(tl.float64) / s_all
        else:
            pmass = tl.zeros((H_PAD, BQ), tl.float64)
        tl.store(rows_ptr + 3 * plane + ridx, pmass, mask=row_ok)
        tl.store(rows_ptr + 4 * plane + ridx, bad.to(tl.float64), mask=row_ok)
        hc = hh[None, :]
        pidx = ((b * QB + pid) * H_PAD + hr) * H_PAD + hc
        tl.store(cross_ptr + pidx, cross)
        if DO_JS:
            tl.store(js_ptr + pidx, jsacc)

    _KERNEL_INTERPRETED = type(_stats_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    _KERNEL_INTERPRETED = False


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, num_prefix: int, dist: torch.Tensor,
           block_q: int, block_k: int) -> None:
    if triton is None:
        raise UnsupportedStatsShape(f"fused attention statistics need triton, which cannot be imported "
                                    f"({_TRITON_ERROR})")
    if q.dim() != 4 or k.dim() != 4:
        raise UnsupportedStatsShape(f"fused statistics: q and k must be (B, H, N, d), got {tuple(q.shape)} and "
                                    f"{tuple(k.shape)}")
    if q.shape != k.shape:
        raise UnsupportedStatsShape(f"fused statistics: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same "
                                    "shape (self-attention, heads already expanded)")
    B, H, N, d = q.shape
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedStatsShape(f"fused statistics: q/k dtype must be one of float32, bfloat16, float16 (the same "
                                    f"for both), got {q.dtype} and {k.dtype}")
    if not 1 <= H <= MAX_HEADS:
        raise UnsupportedStatsShape(f"fused statistics: {H} heads, the kernel handles 1..{MAX_HEADS}")
    if not HEAD_DIMS[0] <= d <= HEAD_DIMS[1]:
        raise UnsupportedStatsShape(f"fused statistics: head dim {d}, the kernel handles "
                                    f"{HEAD_DIMS[0]}..{HEAD_DIMS[1]}")
    if not 0 <= num_prefix <= MAX_PREFIX or num_prefix >= N:
        raise UnsupportedStatsShape(f"fused statistics: num_prefix={num_prefix} with {N} tokens, the kernel handles "
                                    f"0..{MAX_PREFIX} prefix tokens and at least one patch token")
    K = N - num_prefix
    if not (tuple(dist.shape) == (K, K) or (dist.dim() == 3 and tuple(dist.shape[1:]) == (K, K)
                                             and B % dist.shape[0] == 0)):
        raise UnsupportedStatsShape(f"fused statistics: dist must be the ({K}, {K}) patch distance matrix, or "
                                    f"(W, {K}, {K}) per window with W dividing the batch {B}, got {tuple(dist.shape)}")
    if bias is not None:
        if bias.dim() > 4:
            raise UnsupportedStatsShape(f"fused statistics: bias of shape {tuple(bias.shape)} has more than 4 dims")
        try:
            torch.broadcast_shapes(tuple(bias.shape), (B, H, N, N))
        except RuntimeError:
            raise UnsupportedStatsShape(f"fused statistics: bias of shape {tuple(bias.shape)} does not broadcast to "
                                        f"(B, H, N, N) = {(B, H, N, N)}") from None
    for name, v in (("block_q", block_q), ("block_k", block_k)):
        if v < 1 or v & (v - 1):
            raise UnsupportedStatsShape(f"fused statistics: {name}={v} must be a power of two")
    if block_k <= num_prefix:
        raise UnsupportedStatsShape(f"fused statistics: block_k={block_k} must exceed num_prefix={num_prefix}")
    if not _KERNEL_INTERPRETED:
        if q.device.type != "cuda":
            raise UnsupportedStatsShape(f"fused statistics run on CUDA (or under TRITON_INTERPRET=1), not on "
                                        f"{q.device}")
        if min(block_q, block_k) < 16:
            raise UnsupportedStatsShape("fused statistics: block_q and block_k must be >= 16 on the GPU (tl.dot)")
    devs = {t.device for t in (q, k, dist) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise UnsupportedStatsShape(f"fused statistics: inputs on different devices {sorted(map(str, devs))}")


def fused_chunk_stats(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, num_prefix: int,
                      dist: torch.Tensor, eps: float = 1e-8, js: bool = True, *, renormalize: bool = True,
                      block_q: int | None = None, block_k: int | None = None,
                      num_warps: int | None = None) -> ChunkSums:
    """`chunk_sums_tensors(logits[:, :, P:], dist, P, eps, renormalize, js)` for logits = q k^T * scale + bias.

    q, k: (B, H, N, d) as handed to scaled_dot_product_attention (any strides); bias: None, or an additive float
    mask (or a bool mask, True = attend) broadcastable to (B, H, N, N); dist: (K, K) pixel distances between patch
    centres, K = N - num_prefix, or (W, K, K) for window attention, where batch item b is window b % W. Returns the
    `ChunkSums` of `chunk_sums_tensors` (sums over all K patch queries of each image). One
    difference: `finite` is False also for a NaN/+inf logit on a prefix key (the reference then returns a NaN
    prefix mass). Raises `UnsupportedStatsShape` for inputs the kernel does not handle (use the torch path).
    """
    B, H, N, d = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    bq = block_q or 16
    bk = block_k or 16
    _check(q, k, bias, num_prefix, dist, bq, bk)
    P = int(num_prefix)
    K = N - P
    dev = q.device
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=torch.float32, device=dev).masked_fill_(~bias, float("-inf"))
        elif not bias.is_floating_point():
            raise UnsupportedStatsShape(f"fused statistics: bias dtype {bias.dtype} is neither float nor bool")
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(B, H, N, N)          # stride 0 on broadcast dims, no copy
    if _KERNEL_INTERPRETED:   # numpy has no bfloat16: the interpreter mis-computes bf16 dots (exact upcast instead)
        q, k = (t.float() if t.dtype == torch.bfloat16 else t for t in (q, k))
        if bias is not None and bias.dtype == torch.bfloat16:
            bias = bias.float()
    dist32 = dist.to(torch.float32)
    if dist32.dim() == 2:
        dist32 = dist32.unsqueeze(0)
    QB = triton.cdiv(K, bq)
    H_PAD = max(_next_pow2(H), 1) if _KERNEL_INTERPRETED else 16   # tl.dot on the GPU needs >= 16
    BD = max(16, _next_pow2(d))
    rows = torch.empty(5, B, H, K, dtype=torch.float64, device=dev)
    cross_p = torch.empty(B, QB, H_PAD, H_PAD, dtype=torch.float32, device=dev)
    js_p = torch.empty(B, QB, H_PAD, H_PAD, dtype=torch.float32, device=dev) if js and H > 1 else cross_p
    col_p = torch.empty(B, QB, H, K, dtype=torch.float32, device=dev)
    pe_p = torch.zeros(B, QB, H, max(P, 1), dtype=torch.float64, device=dev)
    bptr = bias if bias is not None else q
    bstr = bias.stride() if bias is not None else (0, 0, 0, 0)
    lib = not _KERNEL_INTERPRETED
    _stats_kernel[(QB, B)](
        q, k, bptr, dist32, rows, cross_p, js_p, col_p, pe_p,
        *q.stride(), *k.stride(), *bstr, *dist32.stride(),
        B, H, N, P, K, d, QB, dist32.shape[0], float(scale), 1.0 / K, K * eps,
        HAS_BIAS=bias is not None, HAS_PREFIX=P > 0, DO_JS=bool(js and H > 1), LIB=lib,
        PREC="ieee" if q.dtype == torch.float32 else None,      # fp32: never TF32; 16-bit: the default
        XPREC="ieee" if _KERNEL_INTERPRETED else "tf32x3",       # the cross-term dot: ~float32 on tensor cores
        H_PAD=H_PAD, BQ=bq, BK=bk, BD=BD, num_warps=num_warps or 8)
    return _reduce(rows, cross_p, js_p if js and H > 1 else None, col_p, pe_p[..., :P].sum(1), H, K, renormalize)


def _reduce(rows: torch.Tensor, cross_p: torch.Tensor, js_p: torch.Tensor | None, col_p: torch.Tensor,
            prefix_each: torch.Tensor, H: int,
            K: int, renormalize: bool) -> ChunkSums:
    """Per-row values and per-program partial sums -> the `ChunkSums` of `chunk_sums_tensors` (float64 sums)."""
    f64 = torch.float64
    rowsum, negent, dist, prefix, bad = rows.unbind(0)                   # (B, H, K) each; prefix = m_i
    B = rowsum.shape[0]
    if not renormalize:
        dist = dist * (1 - prefix)
    cross = cross_p[:, :, :H, :H].to(f64).sum(1)
    js_mat = torch.zeros(B, H, H, dtype=f64, device=rows.device)
    if js_p is not None:
        iu = torch.triu_indices(H, H, 1, device=rows.device)
        up = js_p[:, :, :H, :H].to(f64).sum(1)
        js_mat[:, iu[0], iu[1]] = 0.5 * up[:, iu[0], iu[1]]
        js_mat = js_mat + js_mat.transpose(1, 2)
    rowsum_err = (rowsum.to(torch.float32) - 1).abs().amax()
    finite = (bad == 0).all() & torch.isfinite(prefix).all()
    return ChunkSums(dist=dist.sum(-1), entropy=(math.log(K) - negent).sum(-1), negent=negent.sum(-1),
                     prefix=prefix.sum(-1), cross=cross, js=js_mat, colsum=col_p.to(f64).sum(1), rowsum_err=rowsum_err,
                     finite=finite, prefix_each=prefix_each)
