"""The materialise-all-maps alternative, in float64: an independent reference for the attention metrics.

Materialise every attention map with timm's non-fused attention path (probabilities taken from the input of
`attn_drop`), then apply the textbook formulas in numpy. Deliberately simple; the tests compare the streaming probe
against it, and `benchmarks/probe_throughput.py` uses it as the "store all maps, compute afterwards" baseline."""
from __future__ import annotations

import copy

import numpy as np
import torch


def attention_maps_float64(model, x, dtype=torch.float64):
    """List over blocks of (B, H, N, N) post-softmax attention (float64 by default), via the non-fused path."""
    m = copy.deepcopy(model).to(dtype).eval()
    maps = []
    handles = []
    for blk in m.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: maps.append(inp[0].detach())))
    with torch.no_grad():
        m.forward_features(x.to(dtype))
    for h in handles:
        h.remove()
    return [a.numpy() for a in maps]


def grid_distances(num_prefix, grid, patch):
    gh, gw = grid
    ph, pw = patch
    centres = np.array([((r + 0.5) * ph, (c + 0.5) * pw) for r in range(gh) for c in range(gw)], dtype=np.float64)
    diff = centres[:, None, :] - centres[None, :, :]
    return np.sqrt((diff ** 2).sum(-1))


def reference_metrics(A, num_prefix, grid, patch, eps=1e-8, renormalize=True):
    """Per-head metrics (H,) for one layer's maps A (B, H, N, N), averaged over queries then images."""
    B, H, N, _ = A.shape
    P = num_prefix
    D = grid_distances(P, grid, patch)
    uniform = D.mean()
    rows = A[:, :, P:, :]
    prefix = rows[..., :P].sum(-1)                                  # (B, H, nq)
    p = rows[..., P:]
    if renormalize:
        p = p / p.sum(-1, keepdims=True)
    nq = p.shape[2]
    dist = (p * D[None, None]).sum(-1)                              # (B, H, nq)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    ent = -plogp.sum(-1)
    kl = np.zeros((B, H))
    js = np.zeros((B, H))
    for h in range(H):
        for g in range(H):
            if g == h:
                continue
            kl_hg = (p[:, h] * (np.log(p[:, h] + eps) - np.log(p[:, g] + eps))).sum(-1)   # (B, nq)
            mix = 0.5 * (p[:, h] + p[:, g])

            def kl0(a, b):
                with np.errstate(divide="ignore", invalid="ignore"):
                    t = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0) / np.where(b > 0, b, 1.0)), 0.0)
                return t.sum(-1)

            js_hg = 0.5 * kl0(p[:, h], mix) + 0.5 * kl0(p[:, g], mix)
            kl[:, h] += kl_hg.mean(-1) / (H - 1)
            js[:, h] += js_hg.mean(-1) / (H - 1)
    pk = p.mean(2)                                                  # (B, H, K)
    pk = pk / pk.sum(-1, keepdims=True)
    hk = -(np.where(pk > 0, pk * np.log(np.where(pk > 0, pk, 1.0)), 0.0)).sum(-1)
    mi = hk - ent.mean(-1)
    nmi = mi / np.sqrt(np.log(nq) * hk)
    return {
        "attention_distance_px": dist.mean(-1).mean(0),
        "attention_distance_norm": dist.mean(-1).mean(0) / uniform,
        "head_kl": kl.mean(0),
        "head_js": js.mean(0),
        "entropy": ent.mean(-1).mean(0),
        "prefix_mass": prefix.mean(-1).mean(0) if P else np.zeros(H),
        "nmi": nmi.mean(0),
        "prefix_each": rows[..., :P].mean(2).mean(0),                # (H, P): each prefix token's share
    }


def block_outputs_float64(model, x, dtype=torch.float64):
    """List over blocks of (B, T, C) outputs (the residual stream) of a timm ViT-family model in float64."""
    m = copy.deepcopy(model).to(dtype).eval()
    outs = []
    handles = [blk.register_forward_hook(lambda mod, inp, out: outs.append(out.detach())) for blk in m.blocks]
    with torch.no_grad():
        m.forward_features(x.to(dtype))
    for h in handles:
        h.remove()
    return [o.numpy() for o in outs]


def reference_token_norms(tokens, num_prefix):
    """Per block output (B, T, C): the mean over images of the median (lower middle value) and max patch-token norm,
    and each prefix token's norm, from numpy's norm and sort."""
    n = np.sqrt((tokens.astype(np.float64) ** 2).sum(-1))               # (B, T)
    patch = np.sort(n[:, num_prefix:], axis=1)
    med = patch[:, (patch.shape[1] - 1) // 2]
    return {"patch_median": float(med.mean()), "patch_max": float(patch[:, -1].mean()),
            "prefix": n[:, :num_prefix].mean(0)}


def linear_cka_full_batch(X, Y):
    """Unbiased linear CKA on one batch, float64, written from the textbook formula with explicit centring-free
    U-statistic (Song et al. 2012), independent of mimlab.probe.cka."""
    X = X.reshape(X.shape[0], -1).astype(np.float64)
    Y = Y.reshape(Y.shape[0], -1).astype(np.float64)

    def hsic(K, L):
        n = K.shape[0]
        K = K.copy()
        L = L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        one = np.ones(n)
        return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3))

    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


# ------------------------------------------------------------------------------------- windowed (Swin) reference

def swin_attention_maps_float64(model, x, dtype=torch.float64):
    """For a timm SwinTransformer / SwinTransformerV2: list over blocks (stage-major) of
    (maps (B*nW, H, N, N) post-softmax, block) via the non-fused path (input of `attn_drop`), in float64."""
    m = copy.deepcopy(model).to(dtype).eval()
    maps, blocks, handles = [], [], []
    for stage in m.layers:
        for blk in stage.blocks:
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = False
            blocks.append(blk)
            handles.append(blk.attn.attn_drop.register_forward_hook(
                lambda mod, inp, out: maps.append(inp[0].detach())))
    with torch.no_grad():
        m.forward_features(x.to(dtype))
    for h in handles:
        h.remove()
    return [(a.numpy(), b) for a, b in zip(maps, blocks)]


def swin_window_positions(feat, window, shift):
    """(nW, N, 2) true (row, col) of every token of every window: roll a map of coordinates by -shift exactly as
    the block rolls its input (numpy), then cut it into row-major windows."""
    H, W = feat
    wh, ww = window
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    coords = np.stack([rows, cols], -1)
    coords = np.roll(coords, shift=(-shift[0], -shift[1]), axis=(0, 1))
    coords = coords.reshape(H // wh, wh, W // ww, ww, 2).transpose(0, 2, 1, 3, 4)
    return coords.reshape(-1, wh * ww, 2)


def reference_window_metrics(A, positions, token_px, allowed, eps=1e-8):
    """Per-head metrics (H,) for one window-attention block: A (B*nW, H, N, N) maps, positions (nW, N, 2) true
    token positions, token_px (th, tw), allowed (nW, N, N) bool (the model's shift mask == 0). Every statistic is
    computed per window (as for an image), then averaged over the windows of an image, then over images."""
    BW, H, N, _ = A.shape
    nW = positions.shape[0]
    B = BW // nW
    px = np.stack([(positions[..., 0] + 0.5) * token_px[0], (positions[..., 1] + 0.5) * token_px[1]], -1)
    D = np.sqrt(((px[:, :, None, :] - px[:, None, :, :]) ** 2).sum(-1))          # (nW, N, N)
    uniform = ((D * allowed).sum(-1) / allowed.sum(-1)).mean()
    Dw = np.tile(D, (B, 1, 1))[:, None]                                           # (B*nW, 1, N, N)
    p = A / A.sum(-1, keepdims=True)
    dist = (p * Dw).sum(-1)                                                       # (BW, H, N)

    def xlogy(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log(np.where(b > 0, b, 1.0)), 0.0)

    ent = -xlogy(p, p).sum(-1)
    kl = np.zeros((BW, H))
    js = np.zeros((BW, H))
    for h in range(H):
        for g in range(H):
            if g == h:
                continue
            kl[:, h] += (p[:, h] * (np.log(p[:, h] + eps) - np.log(p[:, g] + eps))).sum(-1).mean(-1) / (H - 1)
            mix = 0.5 * (p[:, h] + p[:, g])
            jsv = 0.5 * (xlogy(p[:, h], p[:, h]) - xlogy(p[:, h], mix)).sum(-1) \
                + 0.5 * (xlogy(p[:, g], p[:, g]) - xlogy(p[:, g], mix)).sum(-1)
            js[:, h] += jsv.mean(-1) / (H - 1)
    pk = p.mean(2)
    hk = -xlogy(pk, pk).sum(-1)
    nmi = (hk - ent.mean(-1)) / np.sqrt(np.log(N) * hk)

    def per_image(v):                                                             # (BW, H) -> (H,)
        return v.reshape(B, nW, H).mean(1).mean(0)

    d = per_image(dist.mean(-1))
    return {"attention_distance_px": d, "attention_distance_norm": d / uniform, "head_kl": per_image(kl),
            "head_js": per_image(js), "entropy": per_image(ent.mean(-1)), "prefix_mass": np.zeros(H),
            "nmi": per_image(nmi)}
