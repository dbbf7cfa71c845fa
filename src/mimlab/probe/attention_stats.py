"""Per-image, per-head attention statistics from attention logits (pure functions).

Notation (see docs/metrics.md): one image, one layer, one head; `A = softmax(s)` is the post-softmax attention of a
row of logits `s` (q.k * scale + bias); the first `P` keys are prefix tokens, the rest a patch grid. For a patch query i:
- prefix mass        m_i  = sum_{j < P} A_ij  (and each prefix token's share A_ij, j < P: CLS, distillation, registers)
- patch attention    p_ij = A_ij / (1 - m_i)  over the K patch keys j
- distance           d_i  = sum_j p_ij * D_ij  (D = pixel distance between patch centres); without renormalisation
                     (an option) d_i = sum_j A_ij D_ij = (1 - m_i) sum_j p_ij D_ij. The other statistics are
                     properties of distributions and always use p.
- entropy            H_i  = -sum_j p_ij log p_ij
- cross term         C_i[h, g] = sum_j p_hij log(p_gij + eps),   KL_i(h || g) = C_i[h, h] - C_i[h, g]
- Jensen-Shannon     JS_i(h, g) = H(M) - (H(p_h) + H(p_g)) / 2,  M = (p_h + p_g) / 2
- NMI (per image)    I(Q;K) = H(mean_i p_i) - mean_i H(p_i) under uniform queries, NMI = I / sqrt(log Nq * H(K))
`chunk_sums_tensors` is the definition (readable torch, float32 or float64); the fused kernels in
`mimlab.probe.backends` compute the same `ChunkSums`. They are sums over the queries of a chunk, so chunks add up;
`finalize_image_stats` turns the sums for complete images into per-image values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METRICS = ("attention_distance_px", "attention_distance_norm", "head_kl", "head_js", "entropy", "prefix_mass", "nmi")


@dataclass
class ChunkSums:
    """Sums over the patch queries of one chunk, per image b and head h (float64)."""

    dist: torch.Tensor      # (b, H)      sum_i d_i
    entropy: torch.Tensor   # (b, H)      sum_i H_i
    negent: torch.Tensor    # (b, H)      sum_i (log K - H_i)   (kept separately: no cancellation for NMI)
    prefix: torch.Tensor    # (b, H)      sum_i m_i
    cross: torch.Tensor     # (b, H, H)   sum_i sum_j p_hij log(K (p_gij + eps))
    js: torch.Tensor        # (b, H, H)   sum_i JS_i(h, g), symmetric, zero diagonal
    colsum: torch.Tensor    # (b, H, K)   sum_i p_ij  (for NMI)
    rowsum_err: torch.Tensor  # max |sum_j p_ij - 1| seen, 0-d (sanity check of the capture)
    finite: torch.Tensor    # 0-d bool: every logit was finite or -inf (masked)
    prefix_each: torch.Tensor  # (b, H, P) sum_i A_ij for each prefix token j (CLS, distillation, registers)

    def __iadd__(self, other: "ChunkSums") -> "ChunkSums":
        for name in ("dist", "entropy", "negent", "prefix", "cross", "js", "colsum", "prefix_each"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.rowsum_err = torch.maximum(self.rowsum_err, other.rowsum_err)
        self.finite = self.finite & other.finite
        return self

    def cat(self, other: "ChunkSums") -> "ChunkSums":
        """The sums of two sets of images, self's first (along the image dimension)."""
        out = {name: torch.cat([getattr(self, name), getattr(other, name)], 0)
               for name in ("dist", "entropy", "negent", "prefix", "cross", "js", "colsum", "prefix_each")}
        return ChunkSums(**out, rowsum_err=torch.maximum(self.rowsum_err, other.rowsum_err),
                         finite=self.finite & other.finite)


def attention_logits(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, scale: float,
                     is_causal: bool = False, q_offset: int = 0) -> torch.Tensor:
    """s = q k^T * scale + bias, exactly what scaled_dot_product_attention softmaxes. q: (b,H,nq,d), k: (b,H,N,d).

    `attn_mask` must already be sliced to the rows of `q` (bool: True = attend). `q_offset` is the row index of
    q[..., 0, :] in the full sequence (for causal masks).
    """
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    if is_causal:
        nq, n = s.shape[-2], s.shape[-1]
        rows = torch.arange(q_offset, q_offset + nq, device=s.device)[:, None]
        cols = torch.arange(n, device=s.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    return s


def _row_lse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maximum m (x's dtype) and log sum_j exp(x_j - m) in float64, kept apart for precision.

    The sum is taken as K c + sum_j (e_j - c) with c = min_j e_j: the residuals are small for nearly uniform rows,
    so the float32 sum keeps ~1e-9 relative precision where it matters, without a float64 copy; and they are never
    negative, so a peaked row (sum ~ 1 << K) does not lose its digits to cancellation, as it would with c = 1.
    """
    m = x.amax(-1, keepdim=True)
    e = torch.exp(x - m)
    c = e.amin(-1, keepdim=True)
    total = x.shape[-1] * c.to(torch.float64) + (e - c).sum(-1, keepdim=True).to(torch.float64)
    return m, total.log()


_MASKED = -1e4   # stands in for -inf logits: exp underflows to exactly 0, differences stay finite


def chunk_sums_tensors(logits: torch.Tensor, dist_rows: torch.Tensor, num_prefix: int, eps: float,
                       renormalize: bool, js: bool = True) -> ChunkSums:
    """Statistics of the patch-query rows in `logits` (b, H, nq, N) whose keys are all N tokens: the definition.

    `dist_rows` (nq, K), K = N - num_prefix: pixel distances from these queries to every patch key; or any shape
    that broadcasts against (b, H, nq, K), e.g. (b, 1, nq, K) when each batch item (a Swin window) has its own.
    Numerics: the elementwise work runs in the dtype of `logits` (float32, or float64 for an exact reference); row
    log-sum-exps and all sums over queries are float64. Log-probabilities are kept relative to uniform
    (log(K p) = (s - max) - (log sum exp(s - max) - log K)), so nearly uniform attention (random init) keeps full
    relative precision in KL, JS and NMI, whose values are then tiny differences of large entropies. No Python-side
    checks: the function compiles as one graph (`torch.compile`); `finite` says whether a logit was NaN or +inf.
    """
    f64 = torch.float64
    b, H, nq, N = logits.shape
    P = num_prefix
    K = N - P
    log_k = math.log(K)
    # -inf (masked) logits -> row max - 1e4: exp underflows to exactly 0 and differences stay finite; relative to
    # the row max, so a row whose logits all lie below -1e4 keeps its shape (a row with no finite logit -> uniform)
    row_max = logits.amax(-1, keepdim=True)
    s = torch.maximum(logits, torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)) + _MASKED)
    sp = s[..., P:] if P else s
    mx, rel_lse = _row_lse(sp)                                          # (b, H, nq, 1): lse_patch = mx + rel_lse
    if P:
        mx_all, rel_all = _row_lse(s)
        # m = sum_{j<P} exp(s_j - lse_all): summed directly (not 1 - patch mass), so a small m keeps its precision
        each = torch.exp(s[..., :P].to(f64) - (mx_all.to(f64) + rel_all))
        prefix = each.sum(-1)
        prefix_each = each.sum(2)
    else:
        prefix = torch.zeros(b, H, nq, dtype=f64, device=s.device)
        prefix_each = torch.zeros(b, H, 0, dtype=f64, device=s.device)
    finite = torch.isfinite(rel_lse).all() & torch.isfinite(mx).all()
    # log(K p) = (s - max) - (log sum exp(s - max) - log K): both parts small for near-uniform and for peaked rows
    lpk = (sp - mx) - (rel_lse - log_k).to(s.dtype)
    p = torch.exp(lpk) * (1.0 / K)                                      # renormalised patch attention (exp of ~0: exact)
    rowsum_err = (p.sum(-1) - 1).abs().amax()
    # log K - H_i = sum_j p_ij log(K p_ij): log(K p) is exact, so rounding of p only perturbs the weights
    negent = (p * lpk).sum(-1).to(f64)
    dist = (p * dist_rows.to(p.dtype)).sum(-1).to(f64)
    if not renormalize:
        dist = dist * (1 - prefix)                                      # A_ij = (1 - m_i) p_ij
    # log(K (p + eps)) = logaddexp(log(K p), log(K eps)): stable for p -> 0 and exact relative to log(K p)
    log_keps = math.log(K * eps)
    ell = torch.clamp_min(lpk, log_keps) + torch.log1p(torch.exp(-(lpk - log_keps).abs()))
    # cross[h, g] = sum_i sum_j p_hij ell_gij, per query in float32, summed over queries in float64
    cross = (p.unsqueeze(2) * ell.unsqueeze(1)).sum(-1).sum(-1, dtype=f64)          # (b, H, H)
    # Jensen-Shannon per pair, without cancellation: with a = |log p_h - log p_g|, p_lo = min(p_h, p_g) and
    # M = (p_h + p_g) / 2:  p_h log(p_h/M) + p_g log(p_g/M) = -p_lo a - 2 M log1p(expm1(-a) / 2)
    js_mat = torch.zeros(b, H, H, dtype=f64, device=s.device)
    if js and H > 1:
        for h in range(H - 1):   # head h against heads h+1.. : views, not gathers; in-place to spare memory traffic
            ph, pg = p[:, h:h + 1], p[:, h + 1:]
            a = torch.sub(lpk[:, h + 1:], lpk[:, h:h + 1]).abs_()
            t = torch.neg(a).expm1_().mul_(0.5).log1p_().mul_(ph + pg)             # 2 M log1p(expm1(-a)/2)
            t.add_(torch.minimum(ph, pg).mul_(a))                                  # + p_lo a  (= -(p_h log.. ))
            js_mat[:, h, h + 1:] = -0.5 * t.sum(-1).sum(-1, dtype=f64)
        js_mat = js_mat + js_mat.transpose(1, 2)
    return ChunkSums(dist=dist.sum(-1), entropy=(log_k - negent).sum(-1), negent=negent.sum(-1),
                     prefix=prefix.sum(-1), cross=cross, js=js_mat, colsum=p.sum(2).to(f64), rowsum_err=rowsum_err,
                     finite=finite, prefix_each=prefix_each)


def finalize_image_stats(s: ChunkSums, num_queries: int, uniform_distance: float,
                         nmi_norm: str = "geometric") -> dict[str, torch.Tensor]:
    """Per-image, per-head values (b, H) from the sums over all `num_queries` patch queries of each image.

    head_kl[h] = 1/(H-1) sum_{g != h} mean_i KL_i(h || g); head_js likewise; NMI as in the module docstring.
    """
    H = s.dist.shape[1]
    nq = float(num_queries)
    diag = torch.diagonal(s.cross, dim1=1, dim2=2)        # (b, H)
    kl_pairs = (diag.unsqueeze(-1) - s.cross) / nq        # (b, H, H): mean_i KL(h || g)
    denom = max(H - 1, 1)
    head_kl = kl_pairs.sum(-1) / denom
    head_js = (s.js / nq).sum(-1) / denom
    dist = s.dist / nq
    entropy = s.entropy / nq
    # NMI under uniform queries: p(k) = mean_i p_ik; I = H(K) - H(K|Q) = mean_i (log K - H_i) - KL(p(k) || uniform)
    K = s.colsum.shape[-1]
    pk = s.colsum / s.colsum.sum(-1, keepdim=True).clamp_min(1e-300)
    kl_uniform = torch.xlogy(pk, pk * K).sum(-1)
    h_k = torch.special.entr(pk).sum(-1)                  # H(K) summed directly: no cancellation when it is tiny
    h_q = torch.tensor(math.log(nq), dtype=torch.float64)
    # I is a difference of two ~log K terms; when attention collapses onto one key its rounding error can exceed
    # the true value: clamp to the bounds 0 <= I <= min(H(Q), H(K)) that mutual information always obeys
    mi = torch.minimum((s.negent / nq - kl_uniform).clamp_min(0), torch.minimum(h_k, h_q))
    if nmi_norm == "geometric":
        norm = torch.sqrt(h_q * h_k)
    elif nmi_norm == "arithmetic":
        norm = 0.5 * (h_q + h_k)
    else:
        raise ValueError(f"nmi_norm must be 'geometric' or 'arithmetic', not {nmi_norm!r}")
    nmi = torch.where(norm > 0, mi / norm.clamp_min(1e-300), torch.zeros_like(mi))
    return {
        "attention_distance_px": dist,
        "attention_distance_norm": dist / uniform_distance,
        "head_kl": head_kl,
        "head_js": head_js,
        "entropy": entropy,
        "prefix_mass": s.prefix / nq,
        "nmi": nmi,
    }
