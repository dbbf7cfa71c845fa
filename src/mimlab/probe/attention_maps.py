"""Attention as pictures (`--maps N`): for the first N images, every head's attention row of chosen queries in every
layer, and attention rollout, from the same capture as the statistics (the q and k each block hands to fused
attention, or its softmaxed logits): no second forward, no other attention implementation.

Queries: every prefix token (class token, distillation token, registers) and chosen patch tokens (grid positions,
default the centre patch). Rows are float64 `softmax(q k^T * scale + mask)` over all N tokens, prefix keys included.

Rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): with A_l the head-mean attention of
layer l, A'_l = (A_l + I) / 2 (the residual connection), rows renormalised, rollout = A'_L ... A'_2 A'_1; its rows
at the chosen queries say how much each input token flows into that query's output at the last layer.
Only global attention (one sequence per image) has maps; window attention (Swin) has none.
"""
from __future__ import annotations

from typing import Any

import torch

from mimlab.errors import ConfigError
from mimlab.probe.attention_stats import attention_logits
from mimlab.probe.capture import SDPACall


def default_queries(grid: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    return ((grid[0] // 2, grid[1] // 2),)


class AttentionMaps:
    """Collects the rows of the first `count` images of a run, for one model."""

    def __init__(self, count: int, num_prefix: int, grid: tuple[int, int], num_layers: int,
                 queries: tuple[tuple[int, int], ...] = (), roles: tuple[str, ...] = ()):
        self.count, self.P, self.grid, self.L = int(count), int(num_prefix), tuple(grid), int(num_layers)
        self.queries = tuple(tuple(q) for q in queries) or default_queries(self.grid)
        for r, c in self.queries:
            if not (0 <= r < grid[0] and 0 <= c < grid[1]):
                raise ConfigError("map_queries", f"{(r, c)} is outside the {grid[0]}x{grid[1]} patch grid (rows and "
                                                 f"columns count from 0)")
        # token index of every query: the prefix tokens, then the chosen patches (row-major after the prefix)
        self.index = list(range(self.P)) + [self.P + r * grid[1] + c for r, c in self.queries]
        self.roles = tuple(roles)
        self.offset = 0                                   # index of this batch's first image in the run
        self.batches: list[dict[str, Any]] = []           # per batch: offset, rows per layer (n, H, Q, N), ...
        self.mean: list[torch.Tensor | None] = [None] * self.L    # this batch: head-mean attention (n, N, N)

    def wanted(self, batch: int) -> int:
        """How many images of this batch (of `batch` images) still need maps."""
        return max(0, min(batch, self.count - self.offset))

    def start_batch(self, x: torch.Tensor, offset: int) -> None:
        self.offset = int(offset)
        n = self.wanted(x.shape[0])
        if n:
            self.batches.append({"offset": self.offset, "images": x[:n].detach().to("cpu", torch.float32),
                                 "rows": [None] * self.L})
            self.mean = [None] * self.L

    def on_attention(self, li: int, call) -> None:
        """Rows of layer `li` for the map images of this batch, from an SDPA call or captured logits."""
        n = self.wanted(call.q.shape[0] if isinstance(call, SDPACall) else call.logits.shape[0])
        if not n:
            return
        if isinstance(call, SDPACall):
            q, k = call.q[:n].to(torch.float64), call.k[:n].to(torch.float64)
            mask = call.attn_mask
            if mask is not None:
                while mask.dim() < 4:
                    mask = mask.unsqueeze(0)
                mask = mask[:n] if mask.shape[0] > 1 else mask
            logits = attention_logits(q, k, mask, call.scale, call.is_causal)
        else:
            logits = call.logits[:n].to(torch.float64)
        attn = torch.softmax(logits, dim=-1)                                   # (n, H, N, N)
        self.batches[-1]["rows"][li] = attn[:, :, self.index].to(torch.float32).cpu()
        self.mean[li] = attn.mean(1).cpu()

    def end_batch(self, batch: int) -> None:
        if self.wanted(batch):
            roll = None
            for a in self.mean:
                a = 0.5 * (a + torch.eye(a.shape[-1], dtype=a.dtype))
                a = a / a.sum(-1, keepdim=True)
                roll = a if roll is None else a @ roll
            self.batches[-1]["rollout"] = roll[:, self.index].to(torch.float32)
            self.mean = [None] * self.L

    def parts(self) -> list[dict[str, Any]]:
        """What this process collected (for `merge` on another)."""
        return self.batches

    def merge(self, parts: list[list[dict[str, Any]]]) -> None:
        """The batches of every process, in image order."""
        self.batches = sorted((b for part in parts for b in part), key=lambda b: b["offset"])

    def result(self) -> dict[str, Any]:
        """Arrays for maps.npz: rows (n, L, H, Q, N), rollout (n, Q, N), the images the model saw (n, 3, h, w, as
        fed: normalised), and what the queries are."""
        if not self.batches:
            return {}
        rows = torch.cat([torch.stack(b["rows"], dim=1) for b in self.batches], 0)
        roles = list(self.roles) if len(self.roles) == self.P else ["prefix"] * self.P
        names = [role if roles.count(role) == 1 else f"{role} {roles[:j + 1].count(role)}"
                 for j, role in enumerate(roles)] + [f"patch ({r}, {c})" for r, c in self.queries]
        return {"rows": rows.numpy(), "rollout": torch.cat([b["rollout"] for b in self.batches], 0).numpy(),
                "images": torch.cat([b["images"] for b in self.batches], 0).numpy(), "queries": names,
                "query_index": self.index, "num_prefix": self.P, "grid": list(self.grid)}
