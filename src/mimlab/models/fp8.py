"""FP8 matrix multiplies for the transformer's linear layers (training on Hopper-class GPUs).

`convert_linears_to_fp8(model)` swaps the `nn.Linear` layers inside the transformer blocks for `FP8Linear`, which
keeps the same parameters (the state dict does not change) but computes its three matmuls with
`torch._scaled_mm` in float8, with dynamic per-tensor scaling (the "tensorwise" recipe of Micikevicius et al.,
"FP8 formats for deep learning", 2022):

    forward    y   = (x8 @ w8^T) * sx * sw + b          x, w cast to e4m3
    backward   dx  = (g8 @ w8) * sg * sw                 g = dL/dy cast to e5m2 (more range, less precision)
               dw  = (g8^T @ x8) * sg * sx

where a tensor t is cast as t8 = sat(t * s_t^-1) with s_t = amax|t| / fmax (fmax = 448 for e4m3, 57344 for e5m2),
so the largest magnitude maps to the format's largest finite value. The matmuls accumulate in float32 on the
tensor cores; outputs are bfloat16 (dx, y) and float32 (dw). Under `torch.compile` the amax reductions and casts
fuse into a couple of memory-bound kernels per matmul.

Only layers whose dimensions are multiples of 16 are converted (a `_scaled_mm` requirement); the patch
embedding, the classifier and the pretraining decoders stay in the autocast precision. On the CPU `_scaled_mm`
also runs (slowly), which is how the tests check the arithmetic against a float64 emulation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def _cast(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t8, s): t8 = saturate(t / s) in `dtype` with s = amax|t| / fmax (float32 scalar), so t ~= t8 * s."""
    fmax = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp_min(1e-12)
    s = amax / fmax
    t8 = (t.float() / s).clamp(-fmax, fmax).to(dtype)
    return t8, s


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major (what `_scaled_mm` wants for its second operand)."""
    return t.t().contiguous().t()


class _FP8Matmul(torch.autograd.Function):
    """y = x @ w^T for x (M, K), w (N, K) with float8 operands; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, sx = _cast(x, E4M3)
        w8, sw = _cast(w, E4M3)
        y = torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = _cast(g.contiguous(), E5M2)
        dx = torch._scaled_mm(g8, _col_major(w8), scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16)
        dw = torch._scaled_mm(g8.t().contiguous(), _col_major(x8), scale_a=sg, scale_b=sx,
                              out_dtype=torch.float32)
        return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), None


def fp8_supported(in_features: int, out_features: int) -> bool:
    return in_features % 16 == 0 and out_features % 16 == 0


class FP8Linear(nn.Linear):
    """`nn.Linear` whose matmul runs in float8 (same parameters and state dict as the layer it replaces).

    Rows of the flattened input are padded to a multiple of 16 when needed. The output is `out_dtype` (bfloat16
    by default: the layer is meant for bf16 autocast training)."""

    out_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out_dtype = self.out_dtype
        m = x2.shape[0]
        pad = (-m) % 16
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        with torch.autocast(x.device.type, enabled=False):
            y = _FP8Matmul.apply(x2, self.weight, out_dtype)
            if pad:
                y = y[:m]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def convert_linears_to_fp8(model: nn.Module, within: str = "blocks") -> list[str]:
    """Replace every eligible `nn.Linear` whose qualified name contains `within` (the transformer blocks; '' = all)
    by an `FP8Linear` sharing its parameters. Returns the names converted."""
    done: list[str] = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and within in full and fp8_supported(child.in_features, child.out_features):
                new = FP8Linear.__new__(FP8Linear)
                nn.Module.__init__(new)
                new.in_features, new.out_features = child.in_features, child.out_features
                new.weight = child.weight
                new.bias = child.bias
                setattr(mod, child_name, new)
                done.append(full)
    return done
