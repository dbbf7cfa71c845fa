"""The study config's surface: every key documented (docs/reproduce.md is generated from the config's definition),
listed in `reproduce --help`, and `--print-config` output read back by `--config` gives the same study."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mimlab.cli import main
from mimlab.reproduce.presets import (PRESETS, StudyConfig, build_config, config_reference_markdown,
                                      load_config_file)

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproduce.md"


def test_every_key_has_a_meaning():
    assert set(StudyConfig.HELP) == {f.name for f in dataclasses.fields(StudyConfig)}


def test_docs_table_is_the_generated_one():
    text = DOC.read_text()
    table = text.split("<!-- config-table:start -->\n", 1)[1].split("<!-- config-table:end -->", 1)[0]
    assert table == config_reference_markdown(), "regenerate docs/reproduce.md's table: config_reference_markdown()"


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {k} " in out for k in StudyConfig.HELP)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_print_config_round_trips(preset, tmp_path, capsys):
    assert main(["reproduce", "--preset", preset, "--print-config"]) == 0
    f = tmp_path / "study.yaml"
    f.write_text(capsys.readouterr().out)
    assert load_config_file(f) == build_config(preset)
