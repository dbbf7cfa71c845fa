"""FP8Linear: its three matmuls against a float64 emulation of the same scaled float8 operands (CPU `_scaled_mm`)."""
from __future__ import annotations

import pytest
import timm
import torch

from mimlab.models.fp8 import E4M3, E5M2, FP8Linear, _cast, convert_linears_to_fp8


def _emulate(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The value the kernel sees: the float8 cast of t, scaled back, in float64."""
    t8, s = _cast(t.detach(), dtype)
    return t8.double() * s.double()


def test_cast_scales_amax_to_the_format_max_and_roundtrips_within_format_precision():
    t = torch.randn(64, 32) * 3
    for dtype, mant in ((E4M3, 3), (E5M2, 2)):
        t8, s = _cast(t, dtype)
        assert t8.dtype == dtype
        assert t8.float().abs().max().item() == torch.finfo(dtype).max
        normal = t8.float().abs() >= torch.finfo(dtype).tiny            # subnormals have fewer significant bits
        rel = ((t8.double() * s.double() - t.double()).abs() / t.double().abs())[normal].max().item()
        assert rel <= 2.0 ** -(mant + 1) * 1.0001      # round to nearest: half an ulp of the mantissa


@pytest.mark.parametrize("rows", [48, 37])          # 37: padded to 48 rows inside
def test_forward_and_backward_equal_the_float64_emulation(rows):
    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 32)
    m = torch.nn.Module()
    m.blocks = torch.nn.Sequential(torch.nn.Linear(64, 32))
    m.blocks[0].load_state_dict(ref.state_dict())
    assert convert_linears_to_fp8(m) == ["blocks.0"]
    lin = m.blocks[0]
    assert isinstance(lin, FP8Linear)
    assert lin.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(rows, 64, requires_grad=True)
    w = lin.weight
    ye = _emulate(x, E4M3) @ _emulate(w, E4M3).t() + lin.bias.double()
    lin.out_dtype = torch.float32                    # the arithmetic itself: float32 accumulation of exact products
    y32 = lin(x)
    assert y32.dtype == torch.float32
    assert (y32.double() - ye).abs().max().item() <= 1e-6 * ye.abs().max().item()
    lin.out_dtype = torch.bfloat16                   # the training default: two bf16 roundings (matmul, + bias)
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 32)
    assert (y.double() - ye).abs().max().item() <= 2.0 ** -7 * ye.abs().max().item()
    g = torch.randn(rows, 32)
    y.backward(g)
    ge = _emulate(g.to(torch.bfloat16), E5M2)       # autograd hands the bf16 output its gradient in bf16
    dxe = ge @ _emulate(w, E4M3)                     # bf16 output
    dwe = ge.t() @ _emulate(x, E4M3)                 # float32 output
    assert (x.grad.double() - dxe).abs().max().item() <= 2.0 ** -7 * dxe.abs().max().item()
    assert (w.grad.double() - dwe).abs().max().item() <= 1e-6 * dwe.abs().max().item()
    # the emulation itself is a coarse approximation of the float64 matmul (3 mantissa bits)
    exact = x.detach().double() @ w.detach().double().t() + lin.bias.double()
    assert ((ye - exact).norm() / exact.norm()).item() < 0.1


def test_convert_only_the_blocks_and_keep_outputs_close():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=4, num_classes=10)
    a = timm.create_model("vit_tiny_patch16_224", **kw)
    b = timm.create_model("vit_tiny_patch16_224", **kw)
    b.load_state_dict(a.state_dict())
    names = convert_linears_to_fp8(b)
    assert sorted(names) == sorted(f"blocks.{i}.{n}" for i in range(2)
                                   for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert type(b.head) is torch.nn.Linear
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = a(x).float(), b(x).float()
    assert ((ya - yb).norm() / ya.norm()).item() < 0.2
    yb.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in b.parameters())
