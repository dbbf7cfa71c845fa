"""Strict import of local checkpoint files (timm, DeiT, MAE, MoCo v3, SimMIM) into timm models.

Reading never executes code from the file: pickles go through `torch.load(weights_only=True)` (with only
`argparse.Namespace` allowlisted, which DeiT/MAE training checkpoints store as `args`), `.safetensors` through
`safetensors.torch.load_file`. Each supported format is converted to the target model's timm key names, then loaded
strictly: every checkpoint key must be used and every model key filled, except what the caller explicitly drops
(`drop_keys`) or allows to stay at its initialisation (`allow_missing`). Key layouts: docs/checkpoints.md.
"""
from __future__ import annotations

import fnmatch
import math
import os
import pickle
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from mimlab.errors import MimlabError

if TYPE_CHECKING:  # torch is imported lazily so that `import mimlab.models.checkpoints` stays cheap
    import torch

FORMATS = ("auto", "timm", "deit", "mae", "mocov3", "simmim", "dinov2", "dinov3", "openai-clip", "open-clip")
# layouts converted by timm's own checkpoint filters (the model's module's `checkpoint_filter_fn`)
TIMM_FILTERED = ("dinov2", "dinov3", "openai-clip", "open-clip")

# Containers a training script wraps its state dict in, searched in this order.
# DINO / iBOT keep `teacher` (the one evaluated) and `student`; I-JEPA `target_encoder` (evaluated) and `encoder`
CONTAINER_KEYS = ("state_dict", "model", "module", "model_ema", "teacher", "target_encoder", "student", "encoder")

MAE_DECODER_PATTERNS = ("mask_token", "decoder_embed.*", "decoder_pos_embed", "decoder_blocks.*", "decoder_norm.*",
                        "decoder_pred.*")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_LIST_LIMIT = 10


@dataclass
class LoadReport:
    """What `load_checkpoint` did. `dropped` and `allowed_missing` hold key names as written in the checkpoint
    (after unwrapping its container) and as named by the model, respectively."""

    path: str
    format: str
    sha256: str
    dropped: list[str] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_loaded: int = 0
    unused_dropped: list[str] = field(default_factory=list)    # checkpoint tensors the caller does not use
    unused_at_init: list[str] = field(default_factory=list)    # model tensors the caller does not use, left at init
    resized: list[str] = field(default_factory=list)           # tensors resampled to the model's grid
    cast_from: list[str] = field(default_factory=list)         # half-precision casts, 'float16 -> float32'
    constant_weights: bool = False                             # every loaded weight tensor holds a single value

    def cast_line(self) -> str | None:
        """One line for the user when half-precision weights were cast up to the model's dtype, or None."""
        if not self.cast_from:
            return None
        return (f"half-precision checkpoint: weights cast {', '.join(self.cast_from)} (exactly; the precision is the "
                "checkpoint's)")

    def constant_warning(self) -> str | None:
        """A warning when every loaded weight tensor is constant (all zeros, say): a degenerate model, or None."""
        if not self.constant_weights:
            return None
        return (f"every weight tensor loaded from {self.path} holds a single value (e.g. all zeros): a degenerate "
                "model whose numbers describe no trained network")

    def unused_line(self) -> str | None:
        """One line for the user about the parts of the checkpoint the caller does not use, or None."""
        if not (self.unused_dropped or self.unused_at_init):
            return None
        parts = []
        if self.unused_dropped:
            parts.append(f"dropped {_preview(self.unused_dropped, 6)}")
        if self.unused_at_init:
            parts.append(f"left {_preview(self.unused_at_init, 6)} at initialisation")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Conversion:
    """Result of `convert_state_dict`: the format used, dropped checkpoint keys, notes, and for every converted key
    the checkpoint key it came from."""

    format: str
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)
    resized: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------- reading

def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0].strip()


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with a little-endian u64 header length followed by a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= path.stat().st_size - 8 and head[8:9] == b"{"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise MimlabError(f"checkpoint '{path}' does not exist")
    if path.is_dir():
        raise MimlabError(f"checkpoint '{path}' is a directory, expected a .pth/.pt/.bin/.safetensors file")
    if not os.access(path, os.R_OK):
        raise MimlabError(f"checkpoint '{path}' is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise MimlabError(f"checkpoint '{path}' is empty (0 bytes)")


def _torch_load(path: Path) -> Any:
    import argparse

    import torch

    from mimlab.utils.io import no_pickle_warning

    try:
        with torch.serialization.safe_globals([argparse.Namespace]), no_pickle_warning():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" not in text:
            raise MimlabError(f"cannot read checkpoint '{path}': corrupt pickle ({_first_line(e)})") from None
        m = re.search(r"GLOBAL ([\w.]+)", text)
        op = re.search(r"Unsupported operand (\d+)", text)
        if m:
            why = f"building it needs the Python object {m.group(1)}, which torch.load(weights_only=True) refuses"
        elif op:
            why = f"it uses pickle opcode {op.group(1)}, which torch.load(weights_only=True) refuses"
        else:
            why = "torch.load(weights_only=True) refuses its contents"
        raise MimlabError(
            f"checkpoint '{path}' is not a weights-only checkpoint: {why} because unpickling it could run arbitrary "
            f"code; mimlab never does that. If you trust the file, extract its tensors once with "
            f"torch.load(..., weights_only=False) and re-save them with "
            f"mimlab.models.checkpoints.save_state_dict(sd, 'weights.safetensors')") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, struct.error) as e:
        raise MimlabError(f"cannot read checkpoint '{path}': truncated or corrupt file ({_first_line(e)})") from None


def _safetensors_load(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (not importable as a stable name)
        raise MimlabError(
            f"cannot read checkpoint '{path}': not a valid safetensors file, truncated or corrupt "
            f"({_first_line(e)})") from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, "torch.Tensor"], str]:
    """Descend through training-script containers to the tensor dict. Returns (state dict, where it was found)."""
    import torch

    where = "checkpoint"
    while True:
        if not isinstance(obj, Mapping):
            raise MimlabError(f"checkpoint '{path}' holds a {type(obj).__name__} at {where}, expected a dict of "
                              f"tensors (a state dict)")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            if not obj:
                raise MimlabError(f"checkpoint '{path}' holds an empty dict at {where}")
            bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise MimlabError(
                f"checkpoint '{path}' has no state dict at {where}: {len(bad)} non-tensor entries "
                f"({_preview(bad)}) and none of the containers {', '.join(CONTAINER_KEYS)}")
        obj = obj[inner]
        where = f"{where}['{inner}']"
    bad_keys = [repr(k) for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise MimlabError(f"checkpoint '{path}' has non-string keys at {where}: {_preview(bad_keys)}")
    return dict(obj), where


def _read(path: str | os.PathLike) -> tuple[dict[str, "torch.Tensor"], str]:
    p = Path(path)
    _check_file(p)
    if p.suffix == ".safetensors" or _looks_like_safetensors(p):
        return _unwrap(_safetensors_load(p), p)
    with open(p, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (PK\x03\x04) or, legacy, a pickle of protocol >= 2 (starts with \x80)
    if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"\x80")):
        raise MimlabError(f"cannot read checkpoint '{p}': corrupt or not a checkpoint (neither a PyTorch zip/pickle "
                          f"file nor safetensors; starts with {magic!r})")
    return _unwrap(_torch_load(p), p)


def read_state_dict(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """Safely read a checkpoint file and return its tensor dict, unwrapped from `state_dict`/`model`/`module`/
    `model_ema` containers. Keys keep the file's naming (use `convert_state_dict` for timm names)."""
    return _read(path)[0]


# --------------------------------------------------------------------------------------------------------- detection

def _strip_ddp(sd: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Remove a `module.` prefix (DistributedDataParallel) if every key carries it."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}, True
    return dict(sd), False


def detect_format(sd: Mapping[str, Any]) -> str:
    """Guess the checkpoint format from its key names (see FORMATS).

    mocov3: keys under `base_encoder.` (optionally `module.`); simmim: `encoder.blocks.*` (and `encoder.`-prefixed
    encoder); mae: MAE decoder keys (`decoder_embed.*`, `decoder_blocks.*`, `decoder_pred.*`); deit: a distillation
    token or head (`dist_token`, `head_dist.*`); otherwise timm. A plain DeiT checkpoint is detected as `timm`, which
    loads it identically.
    """
    keys = list(_strip_ddp(dict.fromkeys(sd))[0])
    if any(k.startswith("base_encoder.") for k in keys):
        return "mocov3"
    if "visual.class_embedding" in keys or ("class_embedding" in keys and any(
            k.startswith("transformer.resblocks.") for k in keys)):
        return "openai-clip"
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open-clip"
    if "storage_tokens" in keys:
        return "dinov3"
    if any(k.startswith(("encoder.blocks.", "encoder.layers.")) for k in keys):
        return "simmim"
    if any(k.startswith(("decoder_embed.", "decoder_blocks.", "decoder_pred.")) for k in keys):
        return "mae"
    if "mask_token" in keys or "register_tokens" in keys:       # the raw DINOv2 release (hub) layout
        return "dinov2"
    if any(k == "dist_token" or k.startswith("head_dist.") for k in keys):
        return "deit"
    return "timm"


# -------------------------------------------------------------------------------------------------------- conversion

def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _preview(items: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


class _Work:
    """A state dict being converted, remembering each key's original checkpoint name."""

    def __init__(self, sd: Mapping[str, "torch.Tensor"], fmt: str):
        self.sd: dict[str, torch.Tensor] = dict(sd)
        self.origin: dict[str, str] = {k: k for k in sd}
        self.conv = Conversion(format=fmt)

    def drop(self, keys: Iterable[str]) -> list[str]:
        out = []
        for k in list(keys):
            if k in self.sd:
                del self.sd[k]
                out.append(self.origin.pop(k))
        self.conv.dropped.extend(out)
        return out

    def rename(self, fn) -> None:
        new_sd, new_origin = {}, {}
        for k, v in self.sd.items():
            nk = fn(k)
            if nk in new_sd:
                raise MimlabError(f"checkpoint keys '{new_origin[nk]}' and '{self.origin[k]}' both map to '{nk}'")
            new_sd[nk], new_origin[nk] = v, self.origin[k]
        self.sd, self.origin = new_sd, new_origin

    def strip_prefix(self, prefix: str) -> None:
        self.rename(lambda k: k[len(prefix):] if k.startswith(prefix) else k)

    def note(self, text: str) -> None:
        self.conv.notes.append(text)


def _raw_grid_tokens(sd: Mapping[str, "torch.Tensor"]) -> int | None:
    """Patch rows of a foreign layout's position embedding (one class row before them), if it has one."""
    for k in ("pos_embed", "positional_embedding", "visual.positional_embedding"):
        if k in sd and sd[k].ndim in (2, 3):
            return int(sd[k].shape[-2]) - 1
    return None


def _convert_with_timm(w: _Work, model: "torch.nn.Module", fmt: str, resize_pos_embed: bool, hint: str) -> None:
    """A release layout that timm's own checkpoint filter converts (OpenAI / open_clip CLIP, raw DINOv2 with or
    without registers, DINOv3): `checkpoint_filter_fn` of the model's timm module. It would also resample a
    position embedding of another grid; that happens only when the caller allowed it."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        raise MimlabError(f"checkpoint{hint} is in the {fmt} layout, which timm converts for its own models only; "
                          f"{type(model).__name__} ({type(model).__module__}) has no checkpoint filter")
    grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", None) or ())
    rows = _raw_grid_tokens(w.sd)
    if rows is not None and len(grid) == 2 and rows != grid[0] * grid[1]:
        if not resize_pos_embed:
            side = math.isqrt(max(rows, 0))
            raise MimlabError(
                f"checkpoint{hint} ({fmt} layout) has a position embedding for a {side}x{side} grid, the model a "
                f"{grid[0]}x{grid[1]} one: ask for the size to use (img_size=N, --img-size N) or "
                "resize_pos_embed=True (--resize-pos-embed) to resample it as timm does")
        w.conv.resized.append(f"pos_embed {math.isqrt(rows)}x{math.isqrt(rows)} -> {grid[0]}x{grid[1]}")
    sd = dict(w.sd)
    if fmt == "openai-clip" and "class_embedding" in sd:          # the visual tower saved on its own
        sd = {f"visual.{k}": v for k, v in sd.items()}
    converted = fn(sd, model)
    w.sd = dict(converted)
    w.origin = {k: k for k in w.sd}
    w.note(f"converted the {fmt} layout with {module.__name__}.checkpoint_filter_fn")


def _convert_mae(w: _Work) -> None:
    dropped = w.drop([k for k in w.sd if _matches(k, MAE_DECODER_PATTERNS)])
    if dropped:
        w.note(f"dropped the MAE decoder and mask token ({len(dropped)} tensors)")


def _convert_mocov3(w: _Work, path_hint: str) -> None:
    if not any(k.startswith("base_encoder.") for k in w.sd):
        raise MimlabError(f"checkpoint{path_hint} is not a MoCo v3 checkpoint: no keys under 'module.base_encoder.'")
    other = [k for k in w.sd if not k.startswith("base_encoder.")]
    momentum = [k for k in other if k.startswith("momentum_encoder.")]
    predictor = [k for k in other if k.startswith("predictor")]
    stray = sorted(set(other) - set(momentum) - set(predictor))
    if stray:
        raise MimlabError(f"MoCo v3 checkpoint{path_hint} has keys outside base_encoder/momentum_encoder/predictor: "
                          f"{_preview(stray)}")
    w.drop(momentum + predictor)
    w.note(f"dropped the MoCo v3 momentum encoder ({len(momentum)} tensors) and predictor ({len(predictor)} tensors)")
    w.strip_prefix("base_encoder.")
    head = w.drop([k for k in w.sd if k.startswith("head.")])
    if head:
        w.note(f"dropped the base encoder's projection MLP head.* ({len(head)} tensors): it is not a classifier")


def _convert_simmim(w: _Work, path_hint: str) -> None:
    if not any(k.startswith("encoder.") for k in w.sd):
        raise MimlabError(f"checkpoint{path_hint} is not a SimMIM checkpoint: no keys under 'encoder.'")
    decoder = w.drop([k for k in w.sd if not k.startswith("encoder.")])
    if decoder:
        w.note(f"dropped the SimMIM decoder ({len(decoder)} tensors: {_preview(decoder, 4)})")
    w.strip_prefix("encoder.")
    if w.drop(["mask_token"]):
        w.note("dropped the SimMIM mask token")
    if any(re.match(r"layers\.\d+\.blocks\.", k) for k in w.sd):
        _convert_official_swin(w)


def _convert_official_swin(w: _Work) -> None:
    """Official Swin/SwinV2 encoder (SimMIM and Swin-Transformer repos) -> timm SwinTransformer(V2) names.

    The official stages downsample at their END (`layers.i.downsample`, i < last), timm's at their START
    (`layers.{i+1}.downsample`); the window mask (`attn_mask`) and SwinV2's `relative_coords_table` are buffers the
    model computes from its own input size and window. Relative position bias tables of another window size are
    resized afterwards like every table (`_resize_tables`); SwinV2's continuous position bias needs no resizing
    (build the model with `pretrained_window_sizes` = the pretraining window, as the official fine-tuning does).
    """
    buffers = w.drop([k for k in w.sd if k.endswith((".attn_mask", "attn.relative_coords_table"))])
    if buffers:
        w.note(f"skipped {len(buffers)} Swin attn_mask / relative_coords_table buffers (recomputed by the model)")
    if "layers.0.downsample.reduction.weight" in w.sd:
        w.rename(lambda k: re.sub(r"^layers\.(\d+)\.downsample\.",
                                  lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k))
        w.note("moved the official end-of-stage downsampling layers.i.downsample to timm's layers.{i+1}.downsample")


def _rename_layer_scale(w: _Work, model_keys: set[str]) -> None:
    """DeiT III / BEiT style `blocks.N.gamma_1` -> timm ViT `blocks.N.ls1.gamma`, when the model uses the latter."""
    pat = re.compile(r"^(blocks\.\d+\.)gamma_([12])$")
    if not any(pat.match(k) for k in w.sd) or any(pat.match(k) for k in model_keys):
        return
    w.rename(lambda k: pat.sub(r"\1ls\2.gamma", k))
    w.note("renamed LayerScale gamma_1/gamma_2 to ls1.gamma/ls2.gamma")


def _drop_index_buffers(w: _Work, model_sd: Mapping[str, "torch.Tensor"]) -> None:
    """`relative_position_index` is a function of the grid: never load it, the model recomputes its own."""
    idx = [k for k in w.sd if k.endswith("relative_position_index")]
    persistent = [k for k in idx if k in model_sd]
    for k in persistent:  # a model that persists the index gets its own value back
        w.sd[k] = model_sd[k].clone()
    gone = w.drop([k for k in idx if k not in model_sd])
    if gone:
        w.note(f"skipped {len(gone)} relative_position_index buffers (recomputed by the model from its grid)")
    if persistent:
        w.note(f"kept the model's own values for {len(persistent)} relative_position_index buffers")


def _window_of_table(n: int) -> tuple[int, int] | None:
    """BEiT table rows = (2*Wh-1)*(2*Ww-1) + 3 (cls-to-token, token-to-cls, cls-to-cls); square windows only."""
    side = math.isqrt(max(n - 3, 0))
    return ((side + 1) // 2,) * 2 if side * side == n - 3 and side % 2 == 1 else None


def _resize_table(v: "torch.Tensor", model: "torch.nn.Module", key: str, target_shape) -> "torch.Tensor":
    from timm.layers import resize_rel_pos_bias_table

    module = model.get_submodule(key.rsplit(".", 1)[0])
    window = tuple(getattr(module, "window_size", None) or ())
    if v.ndim != 2 or len(target_shape) != 2 or v.shape[1] != target_shape[1] or len(window) != 2:
        return v  # left for the shape check to report
    try:
        return resize_rel_pos_bias_table(v, new_window_size=window, new_bias_shape=tuple(target_shape))
    except (ValueError, AssertionError, RuntimeError) as e:
        raise MimlabError(f"cannot resize relative position bias table '{key}' from {tuple(v.shape)} to "
                          f"{tuple(target_shape)}: {_first_line(e)}") from None


def _map_shared_table(w: _Work, model: "torch.nn.Module", model_sd: Mapping[str, "torch.Tensor"]) -> None:
    """SimMIM/BEiT pretraining shares one relative position bias across layers; a per-layer model gets a copy in
    every `blocks.N.attn.relative_position_bias_table` (as SimMIM's fine-tuning code does)."""
    if SHARED_TABLE not in w.sd or SHARED_TABLE in model_sd:
        return
    targets = sorted((k for k in model_sd if re.fullmatch(r"blocks\.\d+\.attn\.relative_position_bias_table", k)),
                     key=lambda k: int(k.split(".")[1]))
    if not targets:
        return  # the strict check reports the unexpected shared table
    table = w.sd.pop(SHARED_TABLE)
    src = w.origin.pop(SHARED_TABLE)
    resized: dict[tuple, torch.Tensor] = {}
    for k in targets:
        shape = tuple(model_sd[k].shape)
        if shape not in resized:
            resized[shape] = table if tuple(table.shape) == shape else _resize_table(table, model, k, shape)
        w.sd[k] = resized[shape].clone()
        w.origin[k] = src
    w.note(f"copied the shared relative position bias table into {len(targets)} per-layer tables "
           f"(blocks.N.attn.relative_position_bias_table)")
    for shape, t in resized.items():
        if t is not table:
            w.note(f"resized the relative position bias table {_grid_text(table.shape[0])} -> "
                   f"{_grid_text(shape[0])} with timm.layers.resize_rel_pos_bias_table")


def _grid_text(rows: int) -> str:
    win = _window_of_table(rows)
    return f"{win[0]}x{win[1]} grid" if win else f"{rows} rows"


def _resize_tables(w: _Work, model: "torch.nn.Module", model_sd: Mapping[str, "torch.Tensor"]) -> None:
    changed = []
    for k, v in list(w.sd.items()):
        if k.endswith("relative_position_bias_table") and k in model_sd and v.shape != model_sd[k].shape:
            new = _resize_table(v, model, k, tuple(model_sd[k].shape))
            if new is not v:
                w.sd[k] = new
                changed.append((k, v.shape[0], new.shape[0]))
    if changed:
        _, a, b = changed[0]
        w.note(f"resized {len(changed)} relative position bias tables {_grid_text(a)} -> {_grid_text(b)} with "
               f"timm.layers.resize_rel_pos_bias_table")


def _resize_pos_embed(w: _Work, model: "torch.nn.Module", model_sd: Mapping[str, "torch.Tensor"],
                      allowed: bool = True) -> None:
    """Absolute position embedding (1, prefix + gh*gw, D) to the model's grid with timm's resample_abs_pos_embed
    (bicubic); the prefix (class/distillation, register) rows are kept as they are. Only when `allowed` (the caller
    asked for the size); otherwise the shape mismatch is left for the strict check to refuse."""
    from timm.layers import resample_abs_pos_embed

    k = "pos_embed"
    if k not in w.sd or k not in model_sd or w.sd[k].shape == model_sd[k].shape or not allowed:
        return
    v, target = w.sd[k], model_sd[k]
    grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", None) or ())
    if v.ndim != 3 or target.ndim != 3 or v.shape[-1] != target.shape[-1] or len(grid) != 2:
        return
    prefix = target.shape[1] - grid[0] * grid[1]
    side = math.isqrt(max(v.shape[1] - prefix, 0))
    if prefix < 0 or side * side != v.shape[1] - prefix:
        return  # the shape check reports it
    w.sd[k] = resample_abs_pos_embed(v, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)
    w.conv.resized.append(f"pos_embed {side}x{side} -> {grid[0]}x{grid[1]}")
    w.note(f"resized pos_embed from a {side}x{side} to a {grid[0]}x{grid[1]} grid ({prefix} prefix tokens kept) "
           f"with timm.layers.resample_abs_pos_embed (bicubic)")


def convert_state_dict(sd: Mapping[str, "torch.Tensor"], model: "torch.nn.Module", fmt: str = "auto",
                       *, source: str | None = None, resize_pos_embed: bool = True
                       ) -> tuple[dict[str, "torch.Tensor"], Conversion]:
    """Convert a checkpoint state dict (file naming) to `model`'s timm key names.

    Drops what the format carries besides the encoder (MAE decoder, MoCo v3 momentum encoder/predictor/projection
    head, SimMIM decoder/mask token, relative position index buffers), copies a shared relative position bias into
    per-layer tables when the model has those, and resizes position embeddings / bias tables to the model's grid.
    Does not check that the result fits the model: `load_checkpoint` does that strictly.
    """
    if fmt not in FORMATS:
        raise MimlabError(f"unknown checkpoint format '{fmt}': choose one of {', '.join(FORMATS)}")
    hint = f" '{source}'" if source else ""
    if not sd:
        raise MimlabError(f"checkpoint{hint} holds an empty state dict")
    stripped, had_ddp = _strip_ddp(sd)
    chosen = detect_format(stripped) if fmt == "auto" else fmt
    w = _Work(sd, chosen)
    if had_ddp:
        w.strip_prefix("module.")
        w.note("removed the DistributedDataParallel 'module.' prefix")
    if any(k.startswith("backbone.") for k in w.sd) and all(k.startswith(("backbone.", "head.")) for k in w.sd):
        w.strip_prefix("backbone.")           # DINO / iBOT: the backbone and its projection head ('head.*')
        w.note("removed the 'backbone.' prefix (DINO / iBOT wrapper)")
    if chosen == "mae":
        _convert_mae(w)
    elif chosen == "mocov3":
        _convert_mocov3(w, hint)
    elif chosen == "simmim":
        _convert_simmim(w, hint)
    elif chosen in TIMM_FILTERED:
        _convert_with_timm(w, model, chosen, resize_pos_embed, hint)
    model_sd = model.state_dict()
    _rename_layer_scale(w, set(model_sd))
    _drop_index_buffers(w, model_sd)
    _map_shared_table(w, model, model_sd)
    _resize_tables(w, model, model_sd)
    _resize_pos_embed(w, model, model_sd, resize_pos_embed)
    w.conv.origin = dict(w.origin)
    return w.sd, w.conv


# ------------------------------------------------------------------------------------------------------ strict load

def _hints(missing: list[str], unexpected: list[str], model_keys: set[str]) -> list[str]:
    """Suggestions for the usual mismatches between a checkpoint and the model built for it."""
    def has(keys, prefix):
        return any(k.startswith(prefix) for k in keys)

    out = []
    if has(unexpected, "head.") and not has(model_keys, "head."):
        out.append("the checkpoint has a classifier the model lacks: drop_keys=['head.*'], or keep it with "
                   "num_classes=N (--model-kwargs num_classes=N)")
    if has(missing, "head.") and not has(unexpected, "head."):
        out.append("the model has a classifier the checkpoint lacks: build it with num_classes=0 or pass "
                   "allow_missing=['head.*'] to keep a fresh head")
    if has(unexpected, "fc_norm.") and has(missing, "norm."):
        out.append("the checkpoint normalises after global average pooling (fc_norm, e.g. MAE fine-tuned): build the "
                   "model with global_pool='avg' (ViT) or use_fc_norm=True (BEiT)")
    if has(unexpected, "norm.") and has(missing, "fc_norm."):
        out.append("the checkpoint has a final token norm (norm.*) but the model uses fc_norm: build it with "
                   "fc_norm=False (ViT) or use_fc_norm=False (BEiT); for fine-tuning with a fresh fc_norm pass "
                   "drop_keys=['norm.*'] allow_missing=['fc_norm.*']")
    if has(unexpected, "dist_token") or has(unexpected, "head_dist."):
        out.append("the checkpoint is a distilled DeiT: use a *_distilled_* architecture")
    if any(".attn.q_bias" in k for k in unexpected) or has(unexpected, "rel_pos_bias."):
        out.append("the checkpoint is BEiT-shaped (q/v biases, relative position bias): use a timm Beit model, e.g. "
                   "beit_base_patch16_224 with use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, "
                   "use_fc_norm=False")
    if any(k.endswith("relative_position_bias_table") for k in missing):
        out.append("the model has relative position bias tables the checkpoint lacks: check use_rel_pos_bias / "
                   "use_shared_rel_pos_bias")
    if "pos_embed" in missing:
        out.append("the model has an absolute position embedding the checkpoint lacks: use_abs_pos_emb=False?")
    if "pos_embed" in unexpected:
        out.append("the checkpoint has an absolute position embedding the model lacks: use_abs_pos_emb=True?")
    if any("gamma" in k for k in missing + unexpected):
        out.append("LayerScale differs: set init_values (e.g. 0.1) exactly when the checkpoint has gamma tensors")
    return out


VIT_WIDTHS = {192: "ViT-Tiny", 384: "ViT-Small", 768: "ViT-Base", 1024: "ViT-Large", 1280: "ViT-Huge",
              1408: "ViT-giant (EVA)", 1536: "ViT-giant (DINOv2)"}


def _width_depth(sd: Mapping[str, "torch.Tensor"]) -> tuple[int | None, int]:
    """The embedding width (from the patch embedding, or the class token) and the number of blocks."""
    width = None
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed"):
        if key in sd and sd[key].dim() >= 2:
            width = int(sd[key].shape[0] if key == "patch_embed.proj.weight" else sd[key].shape[-1])
            break
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return width, len(blocks)


def diagnosis(sd: Mapping[str, "torch.Tensor"], model_sd: Mapping[str, "torch.Tensor"]) -> str | None:
    """One line on the usual cause of a wholesale mismatch: another width or depth of the same family."""
    (cw, cd), (mw, md) = _width_depth(sd), _width_depth(model_sd)
    parts = []
    if cw and mw and cw != mw:
        guess = f" (a {VIT_WIDTHS[cw]} checkpoint?)" if cw in VIT_WIDTHS else ""
        parts.append(f"checkpoint width {cw}, model width {mw}{guess}")
    if cd and md and cd != md:
        parts.append(f"checkpoint depth {cd} blocks, model {md}")
    return "; ".join(parts) + ": build the model that matches (another ARCH or --model-kwargs)" if parts else None


def _check_fit(sd: Mapping[str, "torch.Tensor"], model_sd: Mapping[str, "torch.Tensor"], missing: list[str],
               fmt: str, path: Path, model: "torch.nn.Module") -> None:
    unexpected = sorted(k for k in sd if k not in model_sd)
    shapes = [f"{k} checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
              for k in sd if k in model_sd and sd[k].shape != model_sd[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (in the model, not in the checkpoint): {_preview(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (in the checkpoint, not in the model): "
                     f"{_preview(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {_preview(shapes)}")
    hints = _hints(missing, unexpected, set(model_sd))
    if any(s.startswith("pos_embed ") for s in shapes):
        hints.append("the checkpoint's position embedding is for another grid: ask for the size to use (img_size=N, "
                     "--img-size N) or resize_pos_embed=True (--resize-pos-embed) to resample it as timm does")
    lead = diagnosis(sd, model_sd)
    if lead:
        parts.insert(0, lead)
    text = (f"checkpoint '{path}' (format {fmt}) does not fit {type(model).__name__}: " + "; ".join(parts)
            + (f"; hint: {' / '.join(hints)}" if hints else ""))
    raise MimlabError(text)


def _check_finite(sd: Mapping[str, "torch.Tensor"], params: set[str], origin: Mapping[str, str], path: Path) -> None:
    """Weights with NaN or inf make every number computed from them meaningless: refuse them, naming the tensors
    (parameters only; buffers such as attention masks may legitimately hold -inf)."""
    import torch

    bad = []
    for k, v in sd.items():
        if k in params and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            bad.append(f"{origin.get(k, k)} ({n} of {v.numel()})")
    if bad:
        raise MimlabError(f"checkpoint '{path}' has NaN or inf values in {len(bad)} weight tensors: {_preview(bad)}; "
                          f"every number computed from it would be meaningless")


HALF = ("float16", "bfloat16")


def _check_dtypes(sd: Mapping[str, "torch.Tensor"], model_sd: Mapping[str, "torch.Tensor"],
                  origin: Mapping[str, str], path: Path) -> list[str]:
    """Refuse integer (or boolean) tensors where the model holds floating-point weights: casting them gives a model
    of whole numbers (all-zero int64 tensors, a model of zeros). Returns the half-precision casts up to the model's
    floating dtype ("float16 -> float32")."""
    bad, half = [], set()
    for k, v in sd.items():
        target = model_sd[k]
        if not target.is_floating_point():
            continue
        if not v.is_floating_point():
            bad.append(f"{origin.get(k, k)} ({str(v.dtype).replace('torch.', '')})")
        elif v.dtype != target.dtype and str(v.dtype).replace("torch.", "") in HALF:
            half.add(f"{v.dtype} -> {target.dtype}".replace("torch.", ""))
    if bad:
        raise MimlabError(f"checkpoint '{path}' has {len(bad)} integer tensors where the model holds floating-point "
                          f"weights: {_preview(bad)}; refusing to cast them (a checkpoint of whole numbers is not "
                          "a trained model)")
    return sorted(half)


def _all_constant(sd: Mapping[str, "torch.Tensor"], params: set[str]) -> bool:
    """Every loaded floating-point parameter holds a single value (stops at the first that does not)."""
    import torch

    weights = [v for k, v in sd.items() if k in params and v.is_floating_point() and v.numel()]
    if not weights:
        return False
    for v in weights:
        flat = v.reshape(-1)
        if not bool(torch.all(flat == flat[0])):
            return False
    return True


def load_checkpoint(model: "torch.nn.Module", path: str | os.PathLike, *, fmt: str = "auto",
                    drop_keys: Iterable[str] = (), allow_missing: Iterable[str] = (), unused: Iterable[str] = (),
                    resize_pos_embed: bool = False) -> LoadReport:
    """Load a local checkpoint file into `model` strictly, converting its format to timm names.

    `drop_keys`: glob patterns on the converted (model) key names, removed from the checkpoint before loading.
    `allow_missing`: glob patterns on model key names that may stay at the model's initialisation.
    `unused`: glob patterns of keys the caller does not use (the probe: what follows the last block, the classifier
    above all): such checkpoint keys the model lacks (or holds in another shape) are dropped, such model keys the
    checkpoint lacks stay at initialisation; both are listed in the report (`unused_line`).
    `resize_pos_embed`: resample an absolute position embedding of another grid (timm's bicubic resampling) when
    the caller asked for the model's size; otherwise another grid is a shape mismatch, refused like any other.
    Anything else missing, unexpected or of the wrong shape raises MimlabError and leaves `model` untouched.
    """
    from mimlab.utils.io import sha256_file

    drop_keys = (drop_keys,) if isinstance(drop_keys, str) else tuple(drop_keys)
    allow_missing = (allow_missing,) if isinstance(allow_missing, str) else tuple(allow_missing)
    if fmt not in FORMATS:
        raise MimlabError(f"unknown checkpoint format '{fmt}': choose one of {', '.join(FORMATS)}")
    p = Path(path)
    raw, where = _read(p)
    sd, conv = convert_state_dict(raw, model, fmt, source=str(p), resize_pos_embed=resize_pos_embed)
    notes = []
    if where != "checkpoint":
        notes.append(f"state dict read from {where}")
    if fmt == "auto":
        notes.append(f"format detected from key names: {conv.format}")
    notes.extend(conv.notes)

    dropped = list(conv.dropped)
    if drop_keys:
        hit = [k for k in sd if _matches(k, drop_keys)]
        for k in hit:
            del sd[k]
            dropped.append(conv.origin.get(k, k))
        nomatch = [pat for pat in drop_keys if not any(fnmatch.fnmatchcase(k, pat) for k in hit)]
        notes.append(f"drop_keys removed {len(hit)} tensors" + (f" (no match: {', '.join(nomatch)})" if nomatch
                                                                  else ""))

    model_sd = model.state_dict()
    unused = (unused,) if isinstance(unused, str) else tuple(unused)
    unused_dropped = [k for k in sd if _matches(k, unused) and (k not in model_sd or sd[k].shape != model_sd[k].shape)]
    for k in unused_dropped:
        del sd[k]
    unused_dropped = [conv.origin.get(k, k) for k in unused_dropped]
    dropped.extend(unused_dropped)
    missing_all = [k for k in model_sd if k not in sd]
    unused_at_init = [k for k in missing_all if _matches(k, unused)]
    allowed = [k for k in missing_all if _matches(k, allow_missing) and k not in set(unused_at_init)]
    missing = [k for k in missing_all if k not in set(allowed) and k not in set(unused_at_init)]
    _check_fit(sd, model_sd, missing, conv.format, p, model)
    if allowed:
        notes.append(f"{len(allowed)} model tensors keep their initialisation (allow_missing)")

    params = {name for name, _ in model.named_parameters()}
    cast_from = _check_dtypes(sd, model_sd, conv.origin, p)
    _check_finite(sd, params, conv.origin, p)
    cast = sorted({f"{sd[k].dtype}->{model_sd[k].dtype}".replace("torch.", "") for k in sd
                   if sd[k].dtype != model_sd[k].dtype})
    if cast:
        notes.append(f"cast checkpoint tensors {', '.join(cast)}")
    full = dict(model_sd)
    full.update(sd)
    model.load_state_dict(full, strict=True)
    return LoadReport(path=str(p), format=conv.format, sha256=sha256_file(p), dropped=dropped,
                      allowed_missing=allowed, notes=notes, num_loaded=len(sd), unused_dropped=unused_dropped,
                      unused_at_init=unused_at_init, resized=list(conv.resized), cast_from=cast_from,
                      constant_weights=_all_constant(sd, params))


# ------------------------------------------------------------------------------------------------------------ saving

def save_state_dict(model_or_sd: "torch.nn.Module | Mapping[str, torch.Tensor]", path: str | os.PathLike) -> Path:
    """Write a state dict atomically as `.safetensors` (each tensor copied contiguous, so shared or strided tensors
    are fine) or as a plain `{name: tensor}` pickle (`.pth`, `.pt`, `.bin`) that weights-only loading accepts."""
    import torch

    from mimlab.utils.io import atomic_path

    p = Path(path)
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    if not isinstance(sd, Mapping):
        raise MimlabError(f"save_state_dict('{p}'): expected a module or a dict of tensors, got "
                          f"{type(sd).__name__}")
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise MimlabError(f"save_state_dict('{p}'): entries that are not str -> tensor: {_preview(bad)}")
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_path(p) as tmp:
            save_file(out, str(tmp), metadata={"format": "pt"})
    elif p.suffix in (".pth", ".pt", ".bin"):
        with atomic_path(p) as tmp:
            torch.save(out, tmp)
    else:
        raise MimlabError(f"save_state_dict: '{p}' must end in .safetensors, .pth, .pt or .bin")
    return p
