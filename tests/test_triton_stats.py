"""The fused Triton statistics kernel against `chunk_sums_tensors`, run by Triton's CPU interpreter.

Tiny shapes: the interpreter runs numpy. Inputs are built here at collection time, the kernel runs in one
subprocess with TRITON_INTERPRET=1, and each test compares its outputs with references computed in this process.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow    # every kernel call runs in one TRITON_INTERPRET subprocess (~8 s of setup)
pytest.importorskip("triton", reason="triton is not importable: the fused kernel is optional")

from mimlab.probe.attention_stats import ChunkSums, chunk_sums_tensors, finalize_image_stats  # noqa: E402

NAMES = ("dist", "entropy", "negent", "prefix", "cross", "js", "colsum", "rowsum_err", "finite", "prefix_each")


# The interpreter is chosen when a @triton.jit function is defined, triton's own library functions (tl.sum, ...)
# included, i.e. TRITON_INTERPRET must be set before triton is first imported. Other tests may already have imported
# triton in this process, so every kernel call of this module runs in one subprocess (inputs and outputs via files).
_WORKER = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import mimlab.probe.backends.triton_kernel as ts
cases = torch.load(sys.argv[1])
out = {"_interpreted": ts._KERNEL_INTERPRETED, "_available_cpu": ts.is_available("cpu")}
for name, (args, kwargs) in cases.items():
    try:
        res = ts.fused_chunk_stats(*args, **kwargs)
        out[name] = tuple(getattr(res, n) for n in ("dist", "entropy", "negent", "prefix", "cross", "js", "colsum",
                                                    "rowsum_err", "finite", "prefix_each"))
    except ts.UnsupportedStatsShape as e:
        out[name] = "UnsupportedStatsShape: " + str(e)
torch.save(out, sys.argv[2])
"""

CASES: dict = {}


def case(name, *args, **kwargs):
    """Register kernel inputs (run later in the worker); returns them for the in-process reference."""
    CASES[name] = (args, kwargs)
    return args, kwargs


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """name -> the kernel's output tuple (or 'UnsupportedStatsShape: message'), computed by the interpreter."""
    d = tmp_path_factory.mktemp("triton_stats")
    torch.save(CASES, d / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", _WORKER, str(d / "in.pt"), str(d / "out.pt")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out = torch.load(d / "out.pt")
    assert out["_interpreted"], "TRITON_INTERPRET=1 did not select the interpreter"
    return out


def make(B, H, N, P, d, *, mult, bias_shape=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, d, generator=g) * mult).to(dtype)
    # k as a non-contiguous view (like timm's qkv.unbind): the kernel must honour strides
    k = (torch.randn(B, N, H, d, generator=g) * mult).to(dtype).transpose(1, 2)
    bias = torch.randn(bias_shape, generator=g) if bias_shape is not None else None
    K = N - P
    side = math.isqrt(K)
    if side * side == K:
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        c = torch.stack([yy, xx], -1).reshape(K, 2).double() * 16 + 8
    else:
        c = torch.rand(K, 2, generator=g, dtype=torch.float64) * 64
    dist = torch.cdist(c, c)
    return q, k, bias, dist


def reference(q, k, bias, scale, P, dist, *, dtype=torch.float32, renormalize=True, js=True):
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) * scale
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.to(dtype)
    return as_tuple(chunk_sums_tensors(s[:, :, P:], dist.to(dtype), P, 1e-8, renormalize, js))


def as_tuple(s: ChunkSums) -> tuple:
    return tuple(getattr(s, n) for n in NAMES)


def assert_matches(got, ref, rtol=1e-4):
    assert len(got) == len(ref) == 10
    for name, a, r in zip(NAMES, got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype, (name, a.shape, r.shape, a.dtype, r.dtype)
        if name == "finite":
            assert bool(a) == bool(r)
        elif name == "rowsum_err":          # float32 rounding of sum_j p_ij: both ~1e-7
            assert float(a) < 2e-6 and float(r) < 2e-6
        else:
            scale = float(r.abs().max()) if r.numel() else 0.0
            torch.testing.assert_close(a, r, rtol=rtol, atol=1e-6 * max(scale, 1e-12), msg=lambda m: f"{name}: {m}")


MAIN = {
    # name: B, H, N, P, d, mult, bias_shape, block_q, block_k, renormalize
    "cls": (2, 3, 17, 1, 16, 1.5, None, 16, 16, True),                   # 2 key blocks (tail of 1 key)
    "bias_two_prefix": (2, 3, 14, 2, 16, 1.5, (1, 3, 14, 14), 8, 8, False),   # rel-pos-like bias, 2x2 blocks
    "bias2d_d24": (2, 2, 20, 4, 24, 1.0, (20, 20), 8, 8, True),          # 2-D bias, head dim not a power of 2
    "no_prefix": (1, 5, 9, 0, 16, 2.0, (1, 1, 1, 9), 4, 4, True),        # no prefix, 5 heads, 3 key blocks
}
for _name, (_B, _H, _N, _P, _d, _mult, _bs, _bq, _bk, _rn) in MAIN.items():
    _q, _k, _bias, _dist = make(_B, _H, _N, _P, _d, mult=_mult, bias_shape=_bs)
    case(_name, _q, _k, _bias, _d ** -0.5, _P, _dist, renormalize=_rn, block_q=_bq, block_k=_bk)


@pytest.mark.parametrize("name", list(MAIN))
def test_matches_chunk_sums_tensors(kernel, name):
    (q, k, bias, scale, P, dist), kw = CASES[name]
    got = kernel[name]
    assert_matches(got, reference(q, k, bias, scale, P, dist, renormalize=kw["renormalize"]))
    # and the float64 truth, through the per-image metrics
    f64 = reference(q, k, bias, scale, P, dist, dtype=torch.float64, renormalize=kw["renormalize"])
    K = q.shape[2] - P
    mine = finalize_image_stats(ChunkSums(*got), K, 50.0)
    true = finalize_image_stats(ChunkSums(*f64), K, 50.0)
    for m in mine:
        torch.testing.assert_close(mine[m], true[m], rtol=1e-5, atol=1e-9, msg=lambda s: f"{m}: {s}")


_q, _k, _bias, _dist = make(2, 3, 17, 1, 16, mult=0.2, bias_shape=(1, 3, 17, 17), seed=3)
case("near_uniform", _q, _k, _bias * 0.01, 0.25, 1, _dist)


def test_near_uniform_keeps_relative_precision(kernel):
    """Random-init-like attention (logit spread ~0.03): KL, JS and NMI are ~1e-4 and still match float64 to 1e-4."""
    (q, k, bias, scale, P, dist), _ = CASES["near_uniform"]
    got = kernel["near_uniform"]
    assert_matches(got, reference(q, k, bias, scale, P, dist))
    K = q.shape[2] - P
    true = finalize_image_stats(ChunkSums(*reference(q, k, bias, scale, P, dist, dtype=torch.float64)), K, 50.0)
    mine = finalize_image_stats(ChunkSums(*got), K, 50.0)
    assert float(true["head_kl"].max()) < 1e-2 and float(true["nmi"].max()) < 1e-2      # really near-uniform
    for m in ("head_kl", "head_js", "nmi", "entropy", "attention_distance_px", "prefix_mass"):
        torch.testing.assert_close(mine[m], true[m], rtol=1e-4, atol=0, msg=lambda s: f"{m}: {s}")


_mask = torch.ones(10, 10, dtype=torch.bool)
_mask[:, 3] = False
_mask[2:, 7] = False
for _dt in (torch.float16, torch.bfloat16):   # (the interpreter computes bf16 dots wrongly: the wrapper upcasts there)
    _q, _k, _, _dist = make(2, 2, 10, 1, 16, mult=1.0, dtype=_dt)
    case(f"bool_{_dt}_nojs", _q, _k, _mask, 0.25, 1, _dist, js=False, block_q=8, block_k=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_bool_mask_half_precision_and_no_js(kernel, dtype):
    """A bool mask (masked keys get -inf logits), half inputs (float32 accumulation), js=False leaves JS at 0."""
    name = f"bool_{dtype}_nojs"
    (q, k, mask, scale, P, dist), _ = CASES[name]
    got = kernel[name]
    assert_matches(got, reference(q, k, mask, scale, P, dist, js=False))
    assert float(got[5].abs().max()) == 0.0
    assert float(got[6][:, :, 3 - P].abs().max()) == 0.0        # the masked key column gets no attention


def _trained_like_case(name: str, P: int, top_first: bool) -> None:
    """The logits of trained-like attention (tests/attention_cases.py) handed to the kernel as its additive bias
    (q = k = 0), 48 patch keys in blocks of 16: a row's minimum and maximum fall in different blocks, so the online
    update of both is exercised. (The interpreter sums with numpy's pairwise sums, which hide the float32
    cancellation the old baseline suffered on the GPU; the torch and C tests show it, with 256 keys.)"""
    sys.path.insert(0, os.path.dirname(__file__))
    from attention_cases import trained_like_logits

    K = 48
    N = P + K
    bias = trained_like_logits(1, 2, K, P, K, top_first=top_first, seed=20 + P).float()
    bias = torch.cat([torch.zeros(1, 2, P, N), bias], 2)
    zeros = torch.zeros(1, 2, N, 16)
    c = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij"), -1).reshape(K, 2) * 16
    case(name, zeros, zeros, bias, 1.0, P, torch.cdist(c, c).double(), block_q=16, block_k=16)


TRAINED_LIKE = {"peaked": (1, False), "peaked_top_first": (1, True), "peaked_top_first_no_prefix": (0, True)}
for _name, (_P, _tf) in TRAINED_LIKE.items():
    _trained_like_case(_name, _P, _tf)


@pytest.mark.parametrize("name", list(TRAINED_LIKE))
def test_trained_like_peaked_rows_match_float64_to_1e5(kernel, name):
    """Every per-image statistic of peaked rows (top probability 0.5-0.99, spreads up to 200; with the maximum on
    the first patch key too, where a baseline of that key's exponential, 1, used to cancel) within 1e-5 of float64."""
    (q, k, bias, scale, P, dist), _ = CASES[name]
    K = q.shape[2] - P
    mine = finalize_image_stats(ChunkSums(*kernel[name]), K, 50.0)
    true = finalize_image_stats(ChunkSums(*reference(q, k, bias, scale, P, dist, dtype=torch.float64)), K, 50.0)
    for m in mine:
        if m == "prefix_mass" and P == 0:
            continue
        err = float(((mine[m] - true[m]).abs() / true[m].abs().clamp_min(1e-30)).max())
        assert err <= 1e-5, f"{m}: relative error {err:.2e}"


_q, _k, _, _dist = make(1, 1, 5, 1, 16, mult=1.0)
case("one_head", _q, _k, None, 0.25, 1, _dist, block_q=4, block_k=4)
_qn = _q.clone()
_qn[0, 0, 2, 0] = float("nan")
case("nan_query", _qn, _k, None, 0.25, 1, _dist, block_q=4, block_k=4)
_bi = torch.zeros(5, 5)
_bi[3, 2] = float("inf")
case("inf_logit", _q, _k, _bi, 0.25, 1, _dist, block_q=4, block_k=4)
_bi = torch.zeros(5, 5)
_bi[3, 0] = float("inf")
case("inf_prefix_logit", _q, _k, _bi, 0.25, 1, _dist, block_q=4, block_k=4)


def test_single_head_and_nonfinite_flag(kernel):
    (q, k, _, scale, P, dist), _ = CASES["one_head"]
    got = kernel["one_head"]
    assert_matches(got, reference(q, k, None, scale, P, dist))
    assert got[4].shape == (1, 1, 1) and got[5].shape == (1, 1, 1)
    fin = NAMES.index("finite")
    assert not bool(kernel["nan_query"][fin])
    assert not bool(kernel["inf_logit"][fin])
    assert not bool(reference(q, k, CASES["inf_logit"][0][2], scale, P, dist)[fin])
    assert not bool(kernel["inf_prefix_logit"][fin])     # stricter than the reference, which gives a NaN prefix mass


_q, _k, _bias, _ = make(4, 2, 9, 0, 16, mult=1.5, bias_shape=(4, 2, 9, 9), seed=5)
_wd = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 30
case("windows", _q, _k, _bias, 0.25, 0, _wd, block_q=8, block_k=8)


def test_per_window_distances(kernel):
    """Window attention: batch item b uses distance matrix b % W (as the probe's Swin adapter lays windows out)."""
    (q, k, bias, scale, P, wd), _ = CASES["windows"]
    got = kernel["windows"]
    W = wd.shape[0]
    for b in range(q.shape[0]):
        ref = reference(q[b:b + 1], k[b:b + 1], bias[b:b + 1], scale, P, wd[b % W])
        assert_matches(tuple(t[b:b + 1] if t.dim() else t for t in got[:7]) + ref[7:], ref)


_K = 4
case("uniform", torch.zeros(1, 2, 6, 16), torch.randn(1, 2, 6, 16), None, 1.0, 2,
     torch.arange(_K * _K, dtype=torch.float64).reshape(_K, _K), block_q=4, block_k=4)


def test_hand_worked_uniform(kernel):
    """q = 0: every row uniform over all N keys -> prefix mass P/N, entropy log K, KL = JS = 0, colsum = K/K."""
    (q, _, _, _, P, dist), _ = CASES["uniform"]
    B, H, N, _ = q.shape
    K = N - P
    dsum, ent, negent, prefix, cross, js, colsum, err, finite, prefix_each = kernel["uniform"]
    torch.testing.assert_close(prefix_each, torch.full((B, H, P), K / N, dtype=torch.float64))
    f64 = torch.float64
    torch.testing.assert_close(prefix, torch.full((B, H), K * P / N, dtype=f64))
    torch.testing.assert_close(ent, torch.full((B, H), K * math.log(K), dtype=f64))
    torch.testing.assert_close(negent, torch.zeros(B, H, dtype=f64), atol=1e-6, rtol=0)
    torch.testing.assert_close(dsum, dist.mean(1).sum().expand(B, H))
    kl = torch.diagonal(cross, dim1=1, dim2=2).unsqueeze(-1) - cross
    assert float(kl.abs().max()) < 1e-6 and float(js.abs().max()) < 1e-7
    torch.testing.assert_close(colsum, torch.ones(B, H, K, dtype=f64))
    assert bool(finite)


BAD = {  # name -> (inputs, words the message must contain)
    "heads": ((torch.zeros(1, 17, 9, 16),) * 2 + (None, 0.25, 1, torch.zeros(8, 8)), "17 heads"),
    "head_dim": ((torch.zeros(1, 2, 9, 8),) * 2 + (None, 0.25, 1, torch.zeros(8, 8)), "head dim 8"),
    "prefix": ((torch.zeros(1, 2, 12, 16),) * 2 + (None, 0.25, 9, torch.zeros(3, 3)), "num_prefix=9"),
    "dist": ((torch.zeros(1, 2, 9, 16),) * 2 + (None, 0.25, 1, torch.zeros(7, 8)), "dist"),
    "bias": ((torch.zeros(1, 2, 9, 16),) * 2 + (torch.zeros(3, 9, 9), 0.25, 1, torch.zeros(8, 8)), "bias"),
    "kshape": ((torch.zeros(1, 2, 9, 16), torch.zeros(1, 2, 8, 16), None, 0.25, 1, torch.zeros(8, 8)), "same shape"),
    "dtype": ((torch.zeros(1, 2, 9, 16, dtype=torch.float64),) * 2 + (None, 0.25, 1, torch.zeros(8, 8)), "dtype"),
}
for _name, (_args, _) in BAD.items():
    case("bad_" + _name, *_args)
case("bad_block", *BAD["heads"][0][:0], torch.zeros(1, 2, 9, 16), torch.zeros(1, 2, 9, 16), None, 0.25, 1,
     torch.zeros(8, 8), block_k=1)


@pytest.mark.parametrize("name", list(BAD) + ["block"])
def test_unsupported_inputs_raise(kernel, name):
    got = kernel["bad_" + name]
    assert isinstance(got, str) and got.startswith("UnsupportedStatsShape"), got
    assert (BAD[name][1] if name in BAD else "block_k=1") in got, got


def test_is_available(kernel):
    assert kernel["_available_cpu"]                    # in the interpreter
    import mimlab.probe.backends.triton_kernel as ts              # here: no interpreter, no GPU

    assert ts.is_available("cpu") is False
    assert ts.is_available("cuda") == (torch.cuda.is_available() and not ts._KERNEL_INTERPRETED)
