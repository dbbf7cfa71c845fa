"""How figures are written (no matplotlib here: the CLI checks these before any work)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from mimlab.errors import ConfigError

DPI = 150                          # reads on a slide at full width
FORMATS = ("png", "pdf", "svg")    # PNG is what report.html embeds; PDF and SVG are vector copies beside it


@dataclass(frozen=True)
class FigureOptions:
    """The PNG always (report.html embeds it), plus vector copies in ``formats``, at ``dpi``."""
    formats: tuple[str, ...] = ("png",)   # any of FORMATS; "png" is added when missing
    dpi: int = DPI                        # raster resolution (PNG; raster parts of PDF / SVG)

    def __post_init__(self) -> None:
        if isinstance(self.formats, str):
            object.__setattr__(self, "formats", parse_formats(self.formats))
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise ConfigError("figure_format", f"{', '.join(map(repr, bad))} is not one of {', '.join(FORMATS)}")
        if not (isinstance(self.dpi, int) and not isinstance(self.dpi, bool) and 30 <= self.dpi <= 1200):
            raise ConfigError("figure_dpi", f"must be an integer in [30, 1200], got {self.dpi!r}")
        object.__setattr__(self, "formats", tuple(dict.fromkeys(("png", *self.formats))))


def parse_formats(text: str) -> tuple[str, ...]:
    """'pdf,svg' -> ('pdf', 'svg'): a comma-separated --figure-format value, lower-cased."""
    return tuple(t.strip().lower() for t in str(text).split(",") if t.strip())


def add_figure_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, study: bool = False) -> None:
    """--figure-format and --figure-dpi, checked by argparse (before any work); ``study``: default None, so that
    the study config's figure_format / figure_dpi apply unless the flag is given."""
    def formats(text: str) -> tuple[str, ...]:
        try:
            return FigureOptions(parse_formats(text)).formats
        except ConfigError as e:
            raise argparse.ArgumentTypeError(e.detail) from None

    where = "the study config's figure_format" if study else "png"
    parser.add_argument("--figure-format", type=formats, default=None if study else ("png",), metavar="FMT[,FMT]",
                        help=f"figure files, comma-separated: {', '.join(FORMATS)}; the PNG is always written (report.html "
                             f"embeds it), PDF and SVG are vector copies beside it (default {where})")
    parser.add_argument("--figure-dpi", type=int, default=None if study else DPI, metavar="DPI",
                        help=f"resolution of the PNGs (default {'the study config' + chr(39) + 's figure_dpi, ' if study else ''}"
                             f"{DPI}; 200-300 for print)")
