"""Build models from `[LABEL=]ARCH[@CHECKPOINT]` specs and `k=v,...` keyword strings."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimlab.errors import ConfigError, MimlabError


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """Parse `img_size=32,patch_size=4,depth=6` into a dict; values are Python literals or bare strings.

    Tuples may be written with parentheses or `x` (`img_size=224x160` -> (224, 160)).
    """
    out: dict[str, Any] = {}
    if not text:
        return out
    parts: list[str] = []
    depth = 0
    buf = ""
    for ch in text:  # split on commas that are not inside brackets
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(buf)
            buf = ""
        else:
            buf += ch
    parts.append(buf)
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ConfigError("model_kwargs", f"'{part}' is not of the form key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        if not key.isidentifier():
            raise ConfigError("model_kwargs", f"'{key}' is not a valid keyword name")
        out[key] = _parse_value(value)
    return out


def _parse_value(value: str) -> Any:
    if "x" in value and all(p.isdigit() for p in value.split("x")):
        return tuple(int(p) for p in value.split("x"))
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


@dataclass
class ModelSpec:
    """A model named on the command line: `[LABEL=]ARCH[@CHECKPOINT]`."""

    label: str
    arch: str
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        return self.checkpoint is None


def parse_model_spec(text: str, model_kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """`LABEL=ARCH@PATH` -> ModelSpec. The label defaults to ARCH (plus the checkpoint's stem if given)."""
    label = None
    rest = text
    if "=" in text.split("@", 1)[0]:
        label, rest = text.split("=", 1)
        label = label.strip()
        if not label:
            raise MimlabError(f"model spec '{text}': empty label before '='")
        if "/" in label:
            raise MimlabError(f"model spec '{text}': a label may not contain '/'")
    arch, _, ckpt = rest.partition("@")
    arch = arch.strip()
    if not arch:
        raise MimlabError(f"model spec '{text}': no architecture name (expected [LABEL=]ARCH[@CHECKPOINT])")
    ckpt = ckpt.strip() or None
    if label is None:
        label = arch if ckpt is None else f"{arch}@{Path(ckpt).stem}"
    return ModelSpec(label=label, arch=arch, checkpoint=ckpt, kwargs=dict(model_kwargs or {}))


def check_arch(arch: str) -> None:
    """Refuse a name timm does not know, suggesting the most similar names (difflib's ratio)."""
    import difflib

    import timm

    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.6)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    raise MimlabError(f"unknown architecture '{arch}': not a timm model name{hint}")


def create_model(arch: str, model_kwargs: dict[str, Any] | None = None, *, checkpoint: str | None = None,
                 checkpoint_format: str = "auto", drop_keys: tuple[str, ...] = (), allow_missing: tuple[str, ...] = (),
                 unused: tuple[str, ...] = (), resize_pos_embed: bool = False, num_classes: int | None = 0,
                 **extra: Any):
    """Create a timm model (no pretrained download, ever) and optionally load a local checkpoint strictly.

    Returns `(model, load_report_or_None)`. `num_classes=0` builds a headless backbone (the probe's default);
    pass None to keep the architecture's own head. `drop_keys`, `allow_missing`, `unused` and `resize_pos_embed`:
    see `mimlab.models.checkpoints.load_checkpoint`.
    """
    import timm

    kwargs = dict(model_kwargs or {})
    kwargs.update(extra)
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    if kwargs.pop("pretrained", False):
        raise MimlabError("pretrained=True would download weights from a hub; pass a local checkpoint with @PATH instead")
    check_arch(arch)
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as e:
        raise MimlabError(f"cannot build '{arch}' with model_kwargs={kwargs} (--model-kwargs): {e}") from None
    except (AssertionError, ValueError, RuntimeError) as e:
        raise MimlabError(f"cannot build '{arch}' with model_kwargs={kwargs} (--model-kwargs): {e}") from None
    report = None
    if checkpoint is not None:
        from mimlab.models.checkpoints import load_checkpoint

        report = load_checkpoint(model, checkpoint, fmt=checkpoint_format, drop_keys=drop_keys,
                                 allow_missing=allow_missing, unused=unused, resize_pos_embed=resize_pos_embed)
    return model, report


def build_from_spec(spec: ModelSpec, **kwargs: Any):
    """Convenience: `create_model` for a parsed ModelSpec."""
    return create_model(spec.arch, spec.kwargs, checkpoint=spec.checkpoint, **kwargs)
