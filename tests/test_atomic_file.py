"""Files written whole or not at all: `report -o` and `compare --json` on a full disk leave nothing behind."""

import os

import pytest

from analysis.atomic_file import write_text_atomically
from tests.filesystems import full_filesystem  # noqa: F401 - fixture
from twinfer.cli import main

RUN = "benchmarks/data/h100/runs/real-h100-qwen3-0.6b-azure-code"


def test_a_write_replaces_the_file_whole_with_the_umasks_permissions(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    previous = os.umask(0o027)
    try:
        write_text_atomically(target, "new")
    finally:
        os.umask(previous)
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_write_on_a_full_disk_leaves_neither_a_file_nor_a_temporary(full_filesystem):
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(full_filesystem / "big.txt", "x" * (64 << 10))
    assert [p.name for p in full_filesystem.iterdir()] == ["filler"]


@pytest.mark.parametrize("command", [["compare", RUN, RUN, "--json"], ["report", RUN, "-o"]])
def test_compare_and_report_on_a_full_disk_fail_in_one_line_and_leave_nothing(full_filesystem, capsys, command):
    name = "comparison.json" if command[0] == "compare" else "report.html"
    assert main([*command, str(full_filesystem / name)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in full_filesystem.iterdir()] == ["filler"]
