"""The CLI's error boundary: an unexpected exception is one line naming a traceback file, never a traceback."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main


@pytest.fixture
def broken_command():
    """A command that fails the way a bug would; removed again after the test."""

    @main.command("boom-for-test")
    def boom():
        raise ValueError("bad internal state\nsecond line")

    yield
    main.commands.pop("boom-for-test")


def test_unexpected_exception_is_one_line_with_a_traceback_file(broken_command):
    result = CliRunner().invoke(main, ["boom-for-test"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "internal error (ValueError: bad internal state)" in lines[0]
    path = Path(lines[0].split("Full traceback in ")[1].split(";")[0])
    text = path.read_text()
    assert "Traceback" in text and "bad internal state" in text and "second line" in text
    path.unlink()


def test_debug_flag_lets_the_exception_through(broken_command):
    result = CliRunner().invoke(main, ["--debug", "boom-for-test"])
    assert isinstance(result.exception, ValueError)


def test_usage_errors_pass_through_unchanged():
    result = CliRunner().invoke(main, ["cache-teacher", "--top-k", "many"])
    assert result.exit_code == 2
    assert "internal error" not in result.output
    assert "--top-k" in result.output
