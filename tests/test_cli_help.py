"""--help shows each option's default as the config dataclass holds it, never a retyped copy."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from stages.config import CacheTeacherConfig, TrainStudentConfig


@pytest.mark.parametrize(
    ("command", "config"), [("cache-teacher", CacheTeacherConfig), ("train-student", TrainStudentConfig)]
)
def test_every_option_shows_its_dataclass_default(command, config) -> None:
    fields = {f.name: f for f in dataclasses.fields(config)}
    options = [p for p in main.commands[command].params if isinstance(p, click.Option)]
    assert {p.name for p in options} - {"config_file", "quiet"} == set(fields)  # every field has a flag
    for option in options:
        assert "(default" not in option.help, f"{option.name} retypes its default"
        if option.name not in fields:
            continue
        f = fields[option.name]
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool) and not option.secondary_opts or default in ("", []):
            assert "[default:" not in option.help  # a plain flag, or an empty "not given"
        elif isinstance(default, bool):
            shown = (option.opts if default else option.secondary_opts)[0].lstrip("-")
            assert option.help.endswith(f"[default: {shown}]")
        else:
            assert option.help.endswith(f"[default: {default}]"), option.name


def test_help_prints_defaults_in_clicks_format() -> None:
    result = CliRunner().invoke(main, ["train-student", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "Examples per shuffle window.  [default: 8192]" in result.output
    assert "[default: tail]" in result.output
