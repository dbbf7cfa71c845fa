"""The online probe: an engine callback that logs per-layer attention statistics of the encoder as it trains.

`online_probe(every, images, data)` returns a `mimlab.engine.Callback` named "probe": every `every` steps (and
before the first and after the last) it runs `mimlab.probe.api.probe` (no CKA, no bootstrap) on a fixed set of
held-out images (`mimlab.data.images.held_out_images`, normalised like the training input) and returns one row
per layer, which the engine writes to `probe.csv` and TensorBoard. Compose it with pretraining:
`pretrain(cfg, callbacks=[online_probe(100, 32, cfg.data, cfg.seed)])` (what `mimlab pretrain --probe-every` does).
"""
from __future__ import annotations

from typing import Any

from mimlab.engine import Callback
from mimlab.errors import ConfigError


def online_probe(every: int, images: int, data: str, seed: int = 0) -> Callback:
    """The callback; `data` is the training data spec (built-in images past the training indices, or files of the
    folder spread over it), `images` how many to probe."""
    if every < 1:
        raise ConfigError("probe_every", f"must be >= 1, got {every}")
    if images < 1:
        raise ConfigError("probe_images", f"must be >= 1, got {images}")
    from mimlab.data.spec import parse_data_spec

    spec = parse_data_spec(data)
    state: dict[str, Any] = {}

    def fn(ctx):
        from mimlab.data.images import held_out_images
        from mimlab.probe.api import probe

        encoder = ctx.model.encoder
        if "images" not in state:
            pe = encoder.patch_embed.img_size
            size = (int(pe[0]), int(pe[1])) if isinstance(pe, (tuple, list)) else (int(pe), int(pe))
            state["images"] = held_out_images(spec, size, images)
        res = probe({"model": encoder}, state["images"], batch_size=min(32, images), device=str(ctx.device), seed=seed,
                    cka=False, bootstrap=0).to_dict()
        rows = []
        for i, layer in enumerate(res["models"]["model"]["layers"]):
            row = {"layer": i}
            row.update({k: float(v) for k, v in layer["layer_mean"].items()})
            rows.append(row)
        return rows

    return Callback("probe", every=every, fn=fn, at_start=True, at_end=True)
