"""Attention capture: exact under fused attention, loud when it cannot work, output unchanged."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mimlab.errors import MimlabError
from mimlab.probe.api import ProbeConfig, probe
from mimlab.probe.capture import CaptureError, capture_attention

KW = dict(img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=0)


def test_model_output_is_unchanged_and_fused_flags_restored():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", **KW).eval()
    m.blocks[0].attn.fused_attn = False          # e.g. TIMM_FUSED_ATTN=0: the probe switches it on, then back
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_features(x)
    calls = []
    mods = [(f"blocks.{i}", b.attn) for i, b in enumerate(m.blocks)]
    with torch.no_grad(), capture_attention(mods, lambda name, call: calls.append((name, call.q.shape))):
        out = m.forward_features(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [c[0] for c in calls] == ["blocks.0", "blocks.1"]
    assert m.blocks[0].attn.fused_attn is False
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


class ManualAttention(nn.Module):
    """Computes softmax attention by hand: there is nothing fused to intercept."""

    def __init__(self, dim, heads):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.num_heads = heads

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


class TwiceAttention(ManualAttention):
    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("cls,word", [(ManualAttention, "never called"), (TwiceAttention, "called 2 times")])
def test_capture_fails_loudly_naming_the_module(cls, word):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", **KW).eval()
    m.blocks[1].attn = cls(32, 2)
    with pytest.raises(CaptureError) as e:
        probe({"m": m}, torch.randn(4, 3, 32, 32), config=ProbeConfig(batch_size=4, bootstrap=0, cka=False))
    msg = str(e.value)
    assert "blocks.1" in msg and cls.__name__ in msg and word in msg
    assert isinstance(e.value, MimlabError)
    # nothing is left patched after the failure
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_token_count_mismatch_is_an_error():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", **KW).eval()
    m.num_prefix_tokens = 2                      # lie about the layout: the capture must notice
    with pytest.raises(CaptureError, match="inspected layout"):
        probe({"m": m}, torch.randn(4, 3, 32, 32), config=ProbeConfig(batch_size=4, bootstrap=0, cka=False))


def test_nan_activations_are_reported_with_the_layer_name():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", **KW).eval()
    with torch.no_grad():
        m.blocks[1].mlp.fc2.bias[0] = float("nan")
    with pytest.raises(MimlabError, match="blocks.1"):
        probe({"m": m}, torch.randn(4, 3, 32, 32), config=ProbeConfig(batch_size=4, bootstrap=0))


def test_dropout_in_train_mode_is_refused():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", attn_drop_rate=0.1, **KW).train()
    mods = [(f"blocks.{i}", b.attn) for i, b in enumerate(m.blocks)]
    with pytest.raises(CaptureError, match="dropout"), capture_attention(mods, lambda n, c: None):
        m.forward_features(torch.randn(2, 3, 32, 32))
