"""Capture exactly what each attention module hands to fused attention, while the model runs unchanged.

While `capture_attention(...)` is active, `torch.nn.functional.scaled_dot_product_attention` is wrapped: when it is
called from inside one of the watched modules, the wrapper passes that call's `(q, k, attn_mask, scale, is_causal)` to
a sink and then runs the original fused kernel, so the model's output is exactly what it would be without the probe.
The post-softmax probabilities the sink derives, `softmax(q k^T * scale + attn_mask)`, are by definition the ones the
fused kernel uses (relative position bias and masks included, since models pass them as `attn_mask`).

Failure is loud: a watched module whose forward does not call SDPA exactly once (manual attention, a custom kernel, a
different code path) raises `CaptureError` naming the module. Modules with timm's `fused_attn` switch are set to the
fused path for the duration and restored afterwards.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mimlab.errors import MimlabError


class CaptureError(MimlabError):
    """Attention of a module could not be captured exactly."""


@dataclass
class SDPACall:
    """The arguments of one scaled_dot_product_attention call, normalised (GQA expanded, scale resolved)."""

    q: torch.Tensor           # (B, H, Nq, d)
    k: torch.Tensor           # (B, H, Nk, d)
    attn_mask: torch.Tensor | None
    scale: float
    is_causal: bool


Sink = Callable[[str, SDPACall], None]

_original_sdpa = F.scaled_dot_product_attention
_state: dict = {"stack": [], "sink": None, "counts": None}


def _sdpa_wrapper(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, **kwargs):
    stack = _state["stack"]
    if stack and _state["sink"] is not None:
        name = stack[-1]
        _state["counts"][name] = _state["counts"].get(name, 0) + 1
        if dropout_p:
            raise CaptureError(f"{name}: attention dropout is active (dropout_p={dropout_p}); probe in eval mode")
        k = key
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            k = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        s = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        _state["sink"](name, SDPACall(query, k, attn_mask, s, bool(is_causal)))
    return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa, **kwargs)


def _watch(modules: Sequence[tuple[str, nn.Module]], state: dict, function: str, need: str) -> list:
    """Hooks that keep `state["stack"]` = the watched module being run and check that its forward called the
    intercepted `function` exactly once (else `CaptureError` naming the module and what the capture needs)."""
    counts: dict[str, int] = {}

    def make_pre(name: str):
        def pre(module, args):
            state["stack"].append(name)
            counts[name] = 0
        return pre

    def make_post(name: str):
        def post(module, args, output):
            state["stack"].pop()
            n = counts.get(name, 0)
            if n != 1:
                how = "never called" if n == 0 else f"called {n} times"
                raise CaptureError(f"cannot capture attention of {name} ({type(module).__name__}): its forward {how} "
                                   f"torch.nn.functional.{function}; {need}")
        return post

    handles = []
    for name, module in modules:
        handles.append(module.register_forward_pre_hook(make_pre(name)))
        handles.append(module.register_forward_hook(make_post(name)))
    state.update(counts=counts, stack=[])
    return handles


@contextmanager
def capture_attention(modules: Sequence[tuple[str, nn.Module]], sink: Sink) -> Iterator[None]:
    """Within the block, every forward of each named module must call SDPA exactly once; each call goes to `sink`."""
    if _state["sink"] is not None:
        raise RuntimeError("capture_attention is not re-entrant")
    saved_fused: list[tuple[nn.Module, bool]] = []
    for _, module in modules:
        if hasattr(module, "fused_attn"):
            saved_fused.append((module, module.fused_attn))
            module.fused_attn = True
    handles = _watch(modules, _state, "scaled_dot_product_attention",
                     "the probe only supports modules that compute attention through one fused SDPA call "
                     "(timm Attention, BEiT, Swin window attention, ...)")
    _state["sink"] = sink
    F.scaled_dot_product_attention = _sdpa_wrapper
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _original_sdpa
        _state.update(sink=None, counts=None, stack=[])
        for h in handles:
            h.remove()
        for module, fused in saved_fused:
            module.fused_attn = fused


# ---------------------------------------------------------------------------------------------- softmax capture
@dataclass
class SoftmaxCall:
    """The input of the one softmax an attention module computes: the logits (B, H, Nq, Nk)."""

    logits: torch.Tensor


_original_softmax = F.softmax
_sm_state: dict = {"stack": [], "sink": None, "counts": None}


def _softmax_wrapper(input, dim=None, _stacklevel=3, dtype=None):
    stack = _sm_state["stack"]
    if stack and _sm_state["sink"] is not None:
        name = stack[-1]
        _sm_state["counts"][name] = _sm_state["counts"].get(name, 0) + 1
        if dim is None or dim not in (-1, input.dim() - 1):
            raise CaptureError(f"{name}: softmax over dim {dim} of a {input.dim()}-d tensor; expected attention "
                               "logits softmaxed over their last (key) dimension")
        _sm_state["sink"](name, SoftmaxCall(input))
    return _original_softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)


@contextmanager
def capture_softmax(modules: Sequence[tuple[str, nn.Module]], sink: Callable[[str, SoftmaxCall], None]
                    ) -> Iterator[None]:
    """For attention computed by hand (SwinV2's cosine attention, Hugging Face eager attention): every forward of
    each named module must call `torch.nn.functional.softmax` exactly once (directly or through `nn.Softmax`);
    its input, the attention logits, goes to `sink`. Anything else raises `CaptureError` naming the module."""
    if _sm_state["sink"] is not None:
        raise RuntimeError("capture_softmax is not re-entrant")
    handles = _watch(modules, _sm_state, "softmax",
                     "the softmax capture needs exactly one softmax over the attention logits (eager attention)")
    _sm_state["sink"] = sink
    F.softmax = _softmax_wrapper
    try:
        yield
    finally:
        F.softmax = _original_softmax
        _sm_state.update(sink=None, counts=None, stack=[])
        for h in handles:
            h.remove()
