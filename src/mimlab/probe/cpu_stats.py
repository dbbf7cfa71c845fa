"""A fused CPU kernel for the probe's attention statistics: `chunk_sums_tensors` in one pass of compiled C.

`cpu_chunk_sums_tensors(logits, dist_rows, num_prefix, eps, renormalize, js)` returns exactly what
`mimlab.probe.attention_stats.chunk_sums_tensors` returns (same tuple, shapes, dtypes and formulas), for float32
logits on the CPU. Eager torch makes ~20 passes over each (heads x queries x keys) block, plus ~10 per pair of
heads for Jensen-Shannon, each a trip through memory at ~1 ns per element; this kernel takes one attention row
of every head at a time (a few KB, in L1) and does all of it there, vectorised (AVX2/AVX-512 through GCC and
glibc's vector math library).

Formulas (the torch path's, see attention_stats): per head and query, with s the logits clamped at
`rowmax - 1e4`, m the patch maximum and K patch keys,
    rel = log sum_j exp(s_j - m) = log(K c + sum_j (e_j - c)), e_j = exp(s_j - m), c = e_0   (float64)
    lpk_j = (s_j - m) - (rel - log K) = log(K p_j),  p_j = exp(lpk_j) / K
    negent = sum p lpk (= log K - entropy), dist = sum p D, colsum_j += p_j, prefix = sum_{j<P} exp(s_j - lse_all)
    cross[h, g] += sum_j p_h ell_g,  ell = log(K p + K eps) = max(lpk, log K eps) + log1p(exp(-|lpk - log K eps|))
    js[h, g] += 1/2 sum_j (p_h + p_g) G(|lpk_h - lpk_g| / 2),  G(x) = x tanh x - log cosh x
(G by its Taylor series below 0.5, by log 2 - 2 x e / (1 + e) - log(1 + e), e = exp(-2x), above; no cancellation.)
Per-query sums are float32, everything summed over queries float64, in a fixed order (one image per task), so
the result does not depend on the number of threads.

The C source is compiled once per machine with the system C compiler (`cc`; GCC or Clang) into a cache folder
(`$MIMLAB_CACHE`, else `~/.cache/mimlab`), keyed by a hash of the source and flags, and loaded with ctypes; the
calls release the GIL, so images run in parallel on Python threads. Compiled with `-ffast-math` for the vector
math, but linked without it (so the process's floating-point mode is left alone); NaN/inf are detected on the
bit patterns, which fast-math cannot optimise away. If no compiler is found, `is_available()` is False and the
probe uses the torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MASKED (-1e4f)

static inline int bad_bits(float x) {            /* NaN or +-inf, from the bit pattern (fast-math safe) */
    uint32_t u; memcpy(&u, &x, 4); return (u & 0x7f800000u) == 0x7f800000u;
}

static inline float js_g(float x) {              /* x tanh x - log cosh x, x >= 0 */
    float x2 = x * x;
    float ser = x2 * (0.5f + x2 * (-0.25f + x2 * (1.0f / 9.0f + x2 * (-17.0f / 360.0f + x2 * (31.0f / 1575.0f
              + x2 * (-691.0f / 85050.0f + x2 * (10922.0f / 3274425.0f + x2 * (-929569.0f / 681080400.0f))))))));
    float xb = x < 0.5f ? 0.5f : x;
    float e = expf(-2.0f * xb);
    float big = 0.6931471805599453f - 2.0f * xb * e / (1.0f + e) - logf(1.0f + e);
    return x < 0.5f ? ser : big;
}

/* log sum_j exp(x_j - m) over n values as log(n c + sum (e_j - c)), c = e_0, in double; m = max x */
static double rel_lse(const float *x, int n, float m, float *e) {
    float c;
    float acc = 0.0f;
    for (int j = 0; j < n; j++) e[j] = expf(x[j] - m);
    c = e[0];
    for (int j = 0; j < n; j++) acc += e[j] - c;
    return log((double)n * (double)c + (double)acc);
}

/*
 * One image b of a chunk. logits (H, nq, N); dist (nq, K); outputs for this image:
 * dsum, esum, nsum, psum (H) doubles; cross, js (H, H) doubles; colsum (H, K) doubles;
 * *rowerr = max |sum p - 1|; *bad = 1 if any logit is NaN/inf (the torch path's `finite` is then False).
 * work: float buffer of at least H * (N + 4 * K) floats.
 */
void image_stats(const float *logits, const float *dist, int H, int nq, int N, int P, float eps,
                 int renormalize, int do_js, double *dsum, double *esum, double *nsum, double *psum,
                 double *cross, double *js, double *colsum, float *rowerr, int *bad, float *work) {
    const int K = N - P;
    const double logk_d = log((double)K);
    const float inv_k = 1.0f / (float)K;
    const float lke = logf((float)K * eps);
    float *s = work;                       /* H x N: clamped logits of this query */
    float *lpk = s + (size_t)H * N;        /* H x K */
    float *p = lpk + (size_t)H * K;        /* H x K */
    float *ell = p + (size_t)H * K;        /* H x K */
    float *tmp = ell + (size_t)H * K;      /* N */
    float err = 0.0f;
    int isbad = 0;
    for (int h = 0; h < H; h++) { dsum[h] = esum[h] = nsum[h] = psum[h] = 0.0; }
    memset(cross, 0, sizeof(double) * H * H);
    memset(js, 0, sizeof(double) * H * H);
    memset(colsum, 0, sizeof(double) * H * K);
    for (int i = 0; i < nq; i++) {
        const float *drow = dist + (size_t)i * K;
        for (int h = 0; h < H; h++) {
            const float *r = logits + ((size_t)h * nq + i) * N;
            float *sh = s + (size_t)h * N;
            float rmax = -INFINITY;
            int rb = 0;
            for (int j = 0; j < N; j++) {   /* -inf is a mask; NaN or +inf is bad */
                uint32_t u; memcpy(&u, &r[j], 4);
                if ((u & 0x7f800000u) == 0x7f800000u && (u != 0xff800000u)) rb = 1;
            }
            isbad |= rb;
            for (int j = 0; j < N; j++) rmax = r[j] > rmax ? r[j] : rmax;
            float floor = (bad_bits(rmax) ? 0.0f : rmax) + MASKED;
            for (int j = 0; j < N; j++) sh[j] = r[j] > floor ? r[j] : floor;
            const float *sp = sh + P;
            float m = -INFINITY;
            for (int j = 0; j < K; j++) m = sp[j] > m ? sp[j] : m;
            double rel = rel_lse(sp, K, m, tmp);
            float off = (float)(rel - logk_d);
            float *lh = lpk + (size_t)h * K, *ph = p + (size_t)h * K, *eh = ell + (size_t)h * K;
            /* K p = exp(l) = 1 + expm1(l): sums of p and of p l keep the relative precision of l near uniform */
            float sem = 0.0f, sl = 0.0f, sel = 0.0f, dd = 0.0f;
            for (int j = 0; j < K; j++) {
                float l = (sp[j] - m) - off;
                float em = expm1f(l);
                float pj = (1.0f + em) * inv_k;
                lh[j] = l; ph[j] = pj;
                /* sum K p l = sum l + sum expm1(l) l for |l| < 1 (exact near uniform); K p l directly below -1
                   (there l may be ~ -1e4 for a masked key, which the split form would cancel in float32) */
                int near = l > -1.0f;
                sem += em; sl += near ? l : 0.0f; sel += near ? em * l : (1.0f + em) * l; dd += pj * drow[j];
            }
            float rs = 1.0f + sem * inv_k;
            /* the vector exp's few-ulp error leaves sum p = rs != 1 by ~1e-7, which would shift negentropy and the
               KL cross terms by that much (large next to near-uniform values): renormalise exactly, p /= rs and
               l -= log rs (cheap passes, no transcendental function) */
            double rs_d = 1.0 + (double)sem / (double)K;
            double lr_d = log1p((double)sem / (double)K);
            float lr = (float)lr_d, inv_rs = (float)(1.0 / rs_d);
            for (int j = 0; j < K; j++) {
                float l = lh[j] - lr;
                lh[j] = l; ph[j] *= inv_rs;
                /* ell = log(K p + K eps) = logaddexp(l, log K eps): exact relative to l, also for p -> 0 */
                eh[j] = (l > lke ? l : lke) + log1pf(expf(-fabsf(l - lke)));
            }
            double ng_d = ((double)sl + (double)sel) / (double)K / rs_d - lr_d;
            float ng = (float)ng_d;
            dd = (float)((double)dd / rs_d);
            double pref = 0.0;
            if (P > 0) {   /* lse over all keys from the patch lse and the few prefix logits, in double */
                double lse_p = (double)m + rel, mx = lse_p, acc = 0.0;
                for (int j = 0; j < P; j++) mx = (double)sh[j] > mx ? (double)sh[j] : mx;
                acc = exp(lse_p - mx);
                for (int j = 0; j < P; j++) acc += exp((double)sh[j] - mx);
                double lse_all = mx + log(acc);
                for (int j = 0; j < P; j++) pref += exp((double)sh[j] - lse_all);
            }
            float e1 = fabsf(rs - 1.0f);
            err = e1 > err ? e1 : err;
            dsum[h] += renormalize ? (double)dd : (double)dd * (1.0 - pref);
            nsum[h] += ng_d;
            esum[h] += logk_d - ng_d;
            psum[h] += pref;
            double *ch = colsum + (size_t)h * K;
            for (int j = 0; j < K; j++) ch[j] += (double)ph[j];
        }
        for (int h = 0; h < H; h++) {
            const float *ph = p + (size_t)h * K;
            for (int g = 0; g < H; g++) {
                const float *eg = ell + (size_t)g * K;
                float acc = 0.0f;
                for (int j = 0; j < K; j++) acc += ph[j] * eg[j];
                cross[h * H + g] += (double)acc;
            }
        }
        if (do_js) {
            for (int h = 0; h < H - 1; h++) {
                const float *ph = p + (size_t)h * K, *lh = lpk + (size_t)h * K;
                for (int g = h + 1; g < H; g++) {
                    const float *pg = p + (size_t)g * K, *lg = lpk + (size_t)g * K;
                    float acc = 0.0f;
                    for (int j = 0; j < K; j++) acc += (ph[j] + pg[j]) * js_g(0.5f * fabsf(lh[j] - lg[j]));
                    js[h * H + g] += 0.5 * (double)acc;
                }
            }
        }
    }
    for (int h = 0; h < H; h++)
        for (int g = 0; g < h; g++) js[h * H + g] = js[g * H + h];
    *rowerr = err;
    *bad = isbad;
}
"""

# -O3 and the native ISA for speed; fast-math only at compile time (vectorised expf/logf from libmvec), never at
# link time (that would link crtfastmath and flush denormals process-wide)
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC", "-std=c99"]
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("MIMLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mimlab")
    return Path(root) / "cpu_stats"


def _build() -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    tag = hashlib.sha256((_SOURCE + " ".join(_CFLAGS) + cc + os.uname().machine).encode()).hexdigest()[:16]
    d = _cache_dir()
    so = d / f"cpu_stats_{tag}.so"
    if not so.is_file():
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src, obj, out = Path(tmp) / "k.c", Path(tmp) / "k.o", Path(tmp) / "k.so"
            src.write_text(_SOURCE)
            for cmd in ([cc, *_CFLAGS, "-c", str(src), "-o", str(obj)],
                        [cc, "-shared", str(obj), "-o", str(out), "-lm", "-lmvec"]):
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0 and "-lmvec" in cmd:   # no libmvec (not glibc): scalar math, still fused
                    cmd.remove("-lmvec")
                    r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[:500]}")
            os.replace(out, so)                              # atomic: a concurrent build just wins or loses
    lib = ctypes.CDLL(str(so))
    f = lib.image_stats
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    f.argtypes = [P, P, I, I, I, I, F, I, I, P, P, P, P, P, P, P, P, P, P]
    f.restype = None
    return lib


def _lib() -> ctypes.CDLL | None:
    global _LIB, _ERROR
    with _LOCK:
        if _LIB is None and _ERROR is None:
            try:
                _LIB = _build()
            except Exception as e:  # no compiler, read-only cache, ...: the torch path is used instead
                _ERROR = f"{type(e).__name__}: {e}"
        return _LIB


def is_available() -> bool:
    """True when the kernel is compiled (or compiles now) and loads."""
    return _lib() is not None


def unavailable_reason() -> str | None:
    _lib()
    return _ERROR


_POOL: tuple[int, ThreadPoolExecutor] | None = None    # (threads, pool), rebuilt when the thread count changes


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != n:
        _POOL = (n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="mimlab-stats"))
    return _POOL[1]


def cpu_chunk_sums_tensors(logits: torch.Tensor, dist_rows: torch.Tensor, num_prefix: int, eps: float,
                           renormalize: bool, js: bool = True) -> tuple[torch.Tensor, ...]:
    """`chunk_sums_tensors` for float32 CPU logits (b, H, nq, N); dist_rows (nq, K) or (b, 1, nq, K)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"the CPU statistics kernel is unavailable: {_ERROR}")
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 4:
        raise ValueError(f"cpu_chunk_sums_tensors: float32 CPU logits (b, H, nq, N), got {logits.dtype} "
                         f"{tuple(logits.shape)} on {logits.device}")
    b, H, nq, N = logits.shape
    P = int(num_prefix)
    K = N - P
    x = logits.contiguous()
    if dist_rows.dim() == 2:
        dist = dist_rows.to(torch.float32).expand(1, nq, K).contiguous()
    else:
        dist = dist_rows.to(torch.float32).reshape(dist_rows.shape[0], nq, K).contiguous()
        if dist.shape[0] not in (1, b):
            raise ValueError(f"cpu_chunk_sums_tensors: dist_rows {tuple(dist_rows.shape)} for {b} images")
    f64 = torch.float64
    dsum = torch.empty(b, H, dtype=f64)
    esum = torch.empty(b, H, dtype=f64)
    nsum = torch.empty(b, H, dtype=f64)
    psum = torch.empty(b, H, dtype=f64)
    cross = torch.empty(b, H, H, dtype=f64)
    js_mat = torch.empty(b, H, H, dtype=f64)
    colsum = torch.empty(b, H, K, dtype=f64)
    rowerr = torch.empty(b, dtype=torch.float32)
    bad = torch.zeros(b, dtype=torch.int32)
    nthreads = max(1, min(torch.get_num_threads(), b))
    work = torch.empty(nthreads, H * (N + 4 * K) + N, dtype=torch.float32)
    per = x.stride(0) * 4
    dper = dist.stride(0) * 4 if dist.shape[0] > 1 else 0

    def run(t: int) -> None:
        w = work[t].data_ptr()
        for i in range(t, b, nthreads):     # images are independent: any split gives the same numbers
            lib.image_stats(x.data_ptr() + i * per, dist.data_ptr() + i * dper, H, nq, N, P, float(eps),
                            int(renormalize), int(bool(js and H > 1)),
                            dsum[i].data_ptr(), esum[i].data_ptr(), nsum[i].data_ptr(), psum[i].data_ptr(),
                            cross[i].data_ptr(), js_mat[i].data_ptr(), colsum[i].data_ptr(),
                            rowerr[i:].data_ptr(), bad[i:].data_ptr(), w)

    if nthreads == 1:
        run(0)
    else:
        list(_pool(nthreads).map(run, range(nthreads)))
    finite = torch.tensor(bool((bad == 0).all()) and bool(torch.isfinite(psum).all()))
    return dsum, esum, nsum, psum, cross, js_mat, colsum, rowerr.max(), finite

