"""benchmarks/common.py: each results script rewrites its own BENCHMARKS.md section and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_section(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the results scripts import it as their sibling
    from common import write_section

    return write_section


def test_section_is_created_then_replaced_alone(write_section, tmp_path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    first = "<!-- lm:start -->\n## LM\nold numbers\n<!-- lm:end -->\n"
    write_section(path, first)
    assert path.read_text() == "# Benchmarks\n\n" + first

    other = "<!-- text:start -->\n## Text\nsomeone else's table\n<!-- text:end -->\n"
    write_section(path, other)
    write_section(path, first.replace("old", "new"))
    text = path.read_text()
    assert text == "# Benchmarks\n\n" + first.replace("old", "new") + "\n" + other
    assert not list(tmp_path.glob("*.tmp"))


def test_rewriting_every_current_section_leaves_benchmarks_md_unchanged(write_section, tmp_path) -> None:
    original = (ROOT / "BENCHMARKS.md").read_text()
    copy = tmp_path / "BENCHMARKS.md"
    copy.write_text(original)
    sections = re.findall(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", original, flags=re.DOTALL)
    assert len(sections) >= 3, sections
    for match in re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", original, flags=re.DOTALL):
        write_section(copy, match[0])
    assert copy.read_text() == original


@pytest.mark.parametrize(
    "bad", ["no markers", "<!-- a:start -->\nx\n<!-- b:end -->", "<!-- a:end -->\nx\n<!-- a:start -->", ""]
)
def test_a_section_without_matching_markers_is_refused(write_section, tmp_path, bad) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n")
    with pytest.raises(ValueError, match="NAME:start"):
        write_section(path, bad)
    assert path.read_text() == "# Benchmarks\n"
