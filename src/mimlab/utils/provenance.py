"""What produced an output: versions, command line, host, time."""
from __future__ import annotations

import datetime as _dt
import platform
import sys
from typing import Any


def provenance(**extra: Any) -> dict[str, Any]:
    import numpy
    import timm
    import torch

    import mimlab

    info: dict[str, Any] = {
        "mimlab_version": mimlab.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "command": sys.argv,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),       # float sums split by thread: part of what made the numbers
    }
    info.update(extra)
    return info
