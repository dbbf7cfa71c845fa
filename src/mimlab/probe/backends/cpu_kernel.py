"""The fused CPU kernel (`cpu_kernel.c`): the attention statistics in one pass of compiled C, and the CKA Grams.

What it computes is `mimlab.probe.attention_stats.chunk_sums_tensors` (the definition), for float32 on the CPU, from
what a block hands to scaled_dot_product_attention (q, k and an additive mask: no (heads x queries x keys) logits
tensor is ever written) or from logits; and the float64 Gram matrix of centred block outputs for CKA
(`feature_gram`, as `mimlab.probe.backends.torch_stats.feature_gram`). The formulas, and how each is kept exact,
are in the comments of `cpu_kernel.c`; `benchmarks/RESULTS.md` has what each piece was measured to cost.

The C source is compiled on first use with the system C compiler (`$CC`, else cc, gcc or clang) into a cache folder
(`mimlab.utils.cache.cache_dir("cpu_kernel")`) and loaded with ctypes. The library's name is a hash of everything
the binary depends on: the source and the generated Jensen-Shannon table, the flags, the compiler's version and the
instruction set that `-march=native` selects on this CPU (the compiler's predefined macros), so a cache shared by
machines with different CPUs (a home directory on a cluster) never hands one of them a library built for another.
A build that fails is remembered by a `.failed` marker (delete it to retry); with no working build the probe uses
the torch path and says so once on stderr.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mimlab.probe.attention_stats import ChunkSums

SOURCE_FILE = Path(__file__).with_name("cpu_kernel.c")

# The Jensen-Shannon function G(x) = x tanh x - log cosh x, tabulated for the kernel as G = x^2 Q(x): Q on JS_NI
# intervals of [0, JS_XMAX), a degree-JS_DEG polynomial on each (the Chebyshev interpolant in float64, written in
# powers of s = x / w - k - 1/2, s in [-1/2, 1/2)). tests/test_cpu_kernel.py checks the table against float64 G.
JS_XMAX, JS_NI, JS_DEG = 10.0, 32, 5

# -O3 and the native ISA for speed; fast-math only at compile time, never at link time (that would link
# crtfastmath and flush denormals process-wide). OpenMP for the batch entries' teams (libgomp.so.1: in a process
# with torch's GNU OpenMP, that same runtime); if that build fails to compile or to load, the build without it.
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC", "-std=gnu11"]
OPENMP_FLAGS = (["-fopenmp"], ["-fopenmp-simd"])

_P, _I, _F, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
# every C entry point: (return type, argument types), declared once
SIGNATURES: dict[str, tuple[type, list[type]]] = {
    "image_stats": (_I, [_P, _P, _I, _I, _I, _I, _F, _I, _I] + [_P] * 10),
    "batch_stats_qk": (_I, [_I, _I, _I, _I, _P, _L, _L, _L, _P, _L, _L, _L, _P, _L, _L, _L, _F, _I, _P, _L, _I, _I,
                            _I, _F, _I, _I] + [_P] * 10),
    "gram_parts": (_I, [_I, _I, _I, _I, _P, _I, _L, _L, _P, _P]),
    "has_openmp": (_I, []),
    "padded_keys": (_I, [_I]),
}
GRAM_PARTS = 8      # column parts of the Gram (fixed, so the sum order does not depend on the number of threads)

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


# ------------------------------------------------------------------------------------------- the JS table
def js_g_over_x2(x):
    """Q(x) = G(x) / x^2 in float64, G(x) = x tanh x - log cosh x = log 2 - 2 x e / (1 + e) - log1p(e), e = exp(-2x);
    by its Taylor series below 0.1 (G = x^2/2 - x^4/4 + x^6/9 - 17 x^8/360 + ...)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-2 * x)
    x2 = x * x
    g = np.log(2) - 2 * x * e / (1 + e) - np.log1p(e)
    ser = 0.5 + x2 * (-0.25 + x2 * (1 / 9 + x2 * (-17 / 360 + x2 * (31 / 1575 + x2 * (-691 / 85050 + x2 * (
        10922 / 3274425 + x2 * (-929569 / 681080400)))))))
    return np.where(x < 0.1, ser, g / np.maximum(x2, 1e-300))


def js_table():
    """(JS_DEG + 1, JS_NI) float32: row d = coefficient of s^d for every interval."""
    import numpy as np
    from numpy.polynomial import chebyshev as C

    w, n = JS_XMAX / JS_NI, JS_DEG + 1
    nodes = np.cos(np.pi * (np.arange(n) + 0.5) / n)
    tab = np.empty((n, JS_NI))
    for k in range(JS_NI):
        cheb = C.chebfit(nodes, js_g_over_x2((k + 0.5 + nodes / 2) * w), JS_DEG)   # interpolant in t = 2 s
        tab[:, k] = C.cheb2poly(cheb) * 2.0 ** np.arange(n)
    return tab.astype(np.float32)


def js_table_header() -> str:
    """`js_table.h`, included by cpu_kernel.c: the table as C constants."""
    rows = ",\n    ".join("{" + ", ".join(f"{float(v)!r}f" for v in row) + "}" for row in js_table())
    return (f"#define JS_NI {JS_NI}\n#define JS_DEG {JS_DEG}\n#define JS_XMAX {JS_XMAX!r}f\n"
            f"static const float JS_TAB[JS_DEG + 1][JS_NI] __attribute__((aligned(64))) = {{\n    {rows}}};\n")


# ------------------------------------------------------------------------------------------------ building
def compiler() -> str:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    return cc


def _run_text(cmd: list[str], stdin: str = "") -> str:
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    return r.stdout + r.stderr if r.returncode == 0 else ""


def target_identity(cc: str, flags: list[str]) -> str:
    """What the binary depends on beyond the source: the compiler's version, and the instruction set these flags
    select here (the compiler's predefined macros with `-march=native`: __AVX512F__, __FMA__, ...), and the CPU
    model and flags the OS reports."""
    version = _run_text([cc, "--version"]).splitlines()[:1]
    macros = _run_text([cc, *CFLAGS, *flags, "-dM", "-E", "-x", "c", "-"])
    cpu = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags",
                                                                                   "Features", "CPU part")}))
    except OSError:
        import platform

        cpu = platform.processor()
    return "\n".join([*version, os.uname().machine, cpu, "".join(sorted(macros.splitlines(keepends=True)))])


def build_tag(cc: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (SOURCE_FILE.read_text(), js_table_header(), " ".join(CFLAGS + flags), cc,
                 target_identity(cc, flags)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _cache_dir() -> Path:
    from mimlab.utils.cache import cache_dir

    return cache_dir("cpu_kernel")


def _compile(cc: str, flags: list[str]) -> Path:
    """The shared library built with these flags (cached under its `build_tag`); a failed build raises
    RuntimeError and leaves a marker, so every process does not retry the same failing build (delete
    `cpu_kernel_*.failed` in the cache folder to retry, e.g. after installing an OpenMP runtime for Clang)."""
    tag = build_tag(cc, flags)
    d = _cache_dir()
    so, failed = d / f"cpu_kernel_{tag}.so", d / f"cpu_kernel_{tag}.failed"
    if so.is_file():
        return so
    if failed.is_file():
        raise RuntimeError(failed.read_text())
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        src, obj, out = Path(tmp) / "cpu_kernel.c", Path(tmp) / "k.o", Path(tmp) / "k.so"
        shutil.copyfile(SOURCE_FILE, src)
        (Path(tmp) / "js_table.h").write_text(js_table_header())
        for cmd in ([cc, *CFLAGS, *flags, "-c", str(src), "-o", str(obj)],
                    [cc, "-shared", *flags, str(obj), "-o", str(out), "-lm", "-lmvec"]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 and "-lmvec" in cmd:   # no libmvec (not glibc): scalar math, still fused
                cmd.remove("-lmvec")
                r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                msg = f"{' '.join(cmd)} failed: {r.stderr.strip()[:500]}"
                failed.write_text(msg)
                raise RuntimeError(msg)
        os.replace(out, so)                              # atomic: a concurrent build just wins or loses
    return so


def _build() -> ctypes.CDLL:
    cc = compiler()
    errors = []
    for flags in OPENMP_FLAGS:       # a build that fails to compile, or to load (e.g. an OpenMP runtime in the
        try:                         # process without the symbols it needs), gives way to the next
            lib = ctypes.CDLL(str(_compile(cc, flags)))
            break
        except (RuntimeError, OSError) as e:
            errors.append(str(e))
    else:
        raise RuntimeError("; ".join(errors))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
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


# ------------------------------------------------------------------------------------------------ calling
_POOL: tuple[int, ThreadPoolExecutor] | None = None    # (threads, pool), rebuilt when the thread count changes


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != n:
        _POOL = (n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="mimlab-stats"))
    return _POOL[1]


def _outputs(b: int, H: int, K: int, P: int) -> list[torch.Tensor]:
    """dist, entropy, negent, prefix, prefix_each (one slot when P = 0: never written), cross, js, colsum, row-sum
    errors, bad flags: the C entries' output buffers, in their argument order."""
    f64 = torch.float64
    return [torch.empty(b, H, dtype=f64) for _ in range(4)] + [torch.empty(b, H, max(P, 1), dtype=f64)] + [
        torch.empty(b, H, H, dtype=f64), torch.empty(b, H, H, dtype=f64), torch.empty(b, H, K, dtype=f64),
        torch.empty(b, dtype=torch.float32), torch.zeros(b, dtype=torch.int32)]


def _padded_dist(lib: ctypes.CDLL, dist_rows: torch.Tensor, b: int, nq: int, K: int) -> torch.Tensor:
    """(1 or b, nq, Kp) float32, zero padded to the kernel's key width, from (nq, K) or (b, 1, nq, K)."""
    Kp = int(lib.padded_keys(K))
    d = dist_rows.to(torch.float32)
    d = d.reshape(1, nq, K) if d.dim() == 2 else d.reshape(d.shape[0], nq, K)
    if d.shape[0] not in (1, b):
        raise ValueError(f"cpu stats kernel: dist_rows {tuple(dist_rows.shape)} for {b} images")
    return torch.nn.functional.pad(d, (0, Kp - K)).contiguous()


def _threads(items: int) -> int:
    """How many sets to split `items` independent items into: torch's thread count, at most one set per item."""
    return max(1, min(torch.get_num_threads(), items))


def _run(n: int, work, team: bool = False) -> None:
    """work(t0, t1, n) does the item sets t0 <= t < t1 of n (set t = items t, t + n, ...; items are independent, so
    any split gives the same numbers) and returns false if it ran out of memory. `team`: work runs its sets on an
    OpenMP team (a C batch entry of a library built with OpenMP), so one call does all; else one call per set, each
    on a thread of our pool."""
    if n == 1 or team:
        ok = [work(0, n, n)]
    else:
        ok = list(_pool(n).map(lambda t: work(t, t + 1, n), range(n)))
    if not all(ok):
        raise MemoryError("cpu stats kernel: out of memory for its work buffers")


def _finish(out: list[torch.Tensor], P: int) -> ChunkSums:
    dsum, esum, nsum, psum, pesum, cross, js_mat, colsum, rowerr, bad = out
    finite = torch.tensor(bool((bad == 0).all()) and bool(torch.isfinite(psum).all()))
    return ChunkSums(dist=dsum, entropy=esum, negent=nsum, prefix=psum, cross=cross, js=js_mat, colsum=colsum,
                     rowsum_err=rowerr.max(), finite=finite, prefix_each=pesum[:, :, :P])


def _ptrs(out: list[torch.Tensor], i: int) -> list[int]:
    return [t[i].data_ptr() for t in out[:8]] + [out[8][i:].data_ptr(), out[9][i:].data_ptr()]


def _lib_for(entry: str, shape: str, **tensors: torch.Tensor) -> ctypes.CDLL:
    """The loaded library for `entry`, once every tensor is float32 on the CPU with as many dimensions as `shape`
    names (ValueError naming the entry, the tensor and the expected shape; RuntimeError without the library)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"the CPU statistics kernel is unavailable: {_ERROR}")
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != shape.count(",") + 1:
            raise ValueError(f"{entry}: float32 CPU {name} {shape}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return lib


def logits_sums(logits: torch.Tensor, dist_rows: torch.Tensor, num_prefix: int, eps: float,
                renormalize: bool, js: bool = True) -> ChunkSums:
    """`chunk_sums_tensors` for float32 CPU logits (b, H, nq, N); dist_rows (nq, K) or (b, 1, nq, K)."""
    lib = _lib_for("logits_sums", "(b, H, nq, N)", logits=logits)
    b, H, nq, N = logits.shape
    P = int(num_prefix)
    K = N - P
    x = logits.contiguous()
    dist = _padded_dist(lib, dist_rows, b, nq, K)
    out = _outputs(b, H, K, P)
    flags = (float(eps), int(renormalize), int(bool(js and H > 1)))

    def work(t0: int, t1: int, n: int) -> bool:
        ok = True
        for t in range(t0, t1):
            for i in range(t, b, n):
                d = dist[i if dist.shape[0] > 1 else 0]
                ok &= bool(lib.image_stats(x[i].data_ptr(), d.data_ptr(), H, nq, N, P, *flags, *_ptrs(out, i)))
        return ok

    _run(_threads(b), work)
    return _finish(out, P)


def qk_sums(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, scale: float, num_prefix: int,
            dist_rows: torch.Tensor, eps: float, renormalize: bool, js: bool = True) -> ChunkSums:
    """`chunk_sums_tensors` of the logits `scale * q k^T + attn_mask` for the patch queries, without forming them.

    q, k: (b, H, N, D) float32 CPU tensors (any strides; the last dimension is made contiguous); attn_mask None or
    an additive float mask broadcastable to (b, H, N, N); dist_rows (N - P, K) or (b, 1, N - P, K).
    """
    lib = _lib_for("qk_sums", "(b, H, N, D)", q=q, k=k)
    if q.shape != k.shape:
        raise ValueError(f"qk_sums: q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    b, H, N, D = q.shape
    P = int(num_prefix)
    K = N - P
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool or not attn_mask.is_floating_point():
            raise ValueError("qk_sums: only additive float masks")
        mask = attn_mask.to(torch.float32)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if mask.shape[0] not in (1, b) or mask.shape[1] not in (1, H) or tuple(mask.shape[2:]) != (N, N):
            raise ValueError(f"qk_sums: mask {tuple(attn_mask.shape)} for {b} x {H} x {N} x {N}")
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    dist = _padded_dist(lib, dist_rows, b, N - P, K)
    out = _outputs(b, H, K, P)
    flags = (float(eps), int(renormalize), int(bool(js and H > 1)))
    qs, ks = q.stride(), k.stride()
    if mask is None:
        mp, mb, mh, mi = None, 0, 0, 0
    else:
        mp, mi = mask.data_ptr(), mask.stride(2)
        mb = mask.stride(0) if mask.shape[0] > 1 else 0
        mh = mask.stride(1) if mask.shape[1] > 1 else 0
    db = dist.stride(0) if dist.shape[0] > 1 else 0
    ptrs = [t.data_ptr() for t in out]

    def work(t0: int, t1: int, n: int) -> int:      # image sets t0 <= t < t1 of n in one C call
        return lib.batch_stats_qk(t0, t1, n, b, q.data_ptr(), qs[0], qs[1], qs[2], k.data_ptr(), ks[0], ks[1], ks[2],
                                  mp, mb, mh, mi, float(scale), D, dist.data_ptr(), db, H, N, P, *flags, *ptrs)

    _run(_threads(b), work, team=bool(lib.has_openmp()))
    return _finish(out, P)


def feature_gram_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For float32 CPU features x (n, d): (G, musq), G = xc xc^T in float64 with xc = x - mean over the rows
    (centred in float32), musq = sum of the squared column means (float64 scalar tensor). As
    `mimlab.probe.backends.torch_stats.feature_gram` computes them with torch, without its float32 and float64
    copies of x."""
    lib = _lib_for("feature_gram_parts", "(n, d)", features=x)
    if x.stride(1) != 1:
        x = x.contiguous()
    n, d = x.shape
    parts = torch.empty(GRAM_PARTS, n, n, dtype=torch.float64)
    musq = torch.empty(GRAM_PARTS, dtype=torch.float64)

    def work(t0: int, t1: int, k: int) -> int:      # column-part sets t0 <= t < t1 of k in one C call
        return lib.gram_parts(t0, t1, k, GRAM_PARTS, x.data_ptr(), n, x.stride(0), d, parts.data_ptr(),
                              musq.data_ptr())

    _run(_threads(GRAM_PARTS), work, team=bool(lib.has_openmp()))
    g = parts[0].clone()
    for p in range(1, GRAM_PARTS):
        g += parts[p]
    g = g.triu() + g.triu(1).T
    return g, musq.sum()


def note_unavailable() -> None:
    """The one line a user sees when the kernel cannot be used (printed once per process)."""
    global _NOTED
    if not _NOTED:
        _NOTED = True
        print(f"note: the fused CPU statistics kernel is unavailable ({unavailable_reason()}); the probe uses the "
              "torch path (same numbers, about 1.8x slower)", file=sys.stderr)


_NOTED = False
