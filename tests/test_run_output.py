"""--out checked before any work and locked against a second run; run folders written with the usual permissions.

Full and read-only file systems are real ones (a small tmpfs) where this machine lets the test mount one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.run_output import RunFolderLock, RunOutputError, check_out_dir
from tests.filesystems import full_filesystem, read_only_filesystem  # noqa: F401 - fixtures
from twinfer.cli import main

ROOT = Path(__file__).resolve().parent.parent
SIMULATE = ["simulate", "demo", "--model", "qwen3-0.6b", "--no-progress"]


def test_a_missing_folder_under_a_writable_one_is_accepted(tmp_path):
    assert check_out_dir(tmp_path / "a" / "b" / "run") == tmp_path / "a" / "b" / "run"
    assert not (tmp_path / "a").exists()  # checking makes nothing


def test_an_empty_folder_is_accepted(tmp_path):
    (tmp_path / "run").mkdir()
    assert check_out_dir(tmp_path / "run") == tmp_path / "run"


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_text("x"), "exists and is not a folder"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), "is a folder of other files \\(notes.txt\\)"),
    (lambda p: (p.mkdir(), (p / "requests.parquet").write_text("")), "holds a run already; pass --overwrite"),
])
def test_what_out_must_not_be(tmp_path, make, problem):
    make(tmp_path / "run")
    with pytest.raises(RunOutputError, match=problem):
        check_out_dir(tmp_path / "run")


def test_overwrite_allows_replacing_a_run_but_never_other_files(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "requests.parquet").write_text("")
    assert check_out_dir(tmp_path / "run", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("")
    with pytest.raises(RunOutputError, match="folder of other files"):
        check_out_dir(tmp_path / "other", overwrite=True)


def test_an_empty_path_and_a_path_under_a_file_are_refused(tmp_path):
    with pytest.raises(RunOutputError, match="--out is empty"):
        check_out_dir("")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunOutputError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "file" / "sub" / "run")


def test_a_full_file_system_is_refused_before_the_run(full_filesystem, capsys):
    with pytest.raises(RunOutputError, match="no space left on the device"):
        check_out_dir(full_filesystem / "run")
    assert main([*SIMULATE, "--out", str(full_filesystem / "run")]) == 2
    captured = capsys.readouterr()
    assert "no space left" in captured.err and "Serving Benchmark Result" not in captured.out
    assert sorted(p.name for p in full_filesystem.iterdir()) == ["filler"]


def test_a_read_only_file_system_is_refused_before_the_run(read_only_filesystem):
    with pytest.raises(RunOutputError, match="--out .*/ro/run: cannot write in .*: the file system is read-only"):
        check_out_dir(read_only_filesystem / "run")


def test_a_second_run_on_a_locked_folder_is_refused_with_the_owner(tmp_path, capsys):
    out = tmp_path / "run"
    # Another process holds the lock, as a run in progress would.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from analysis.run_output import RunFolderLock; "
         f"lock = RunFolderLock({str(out)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunOutputError, match=f"being written by another twinfer run \\(pid {holder.pid}\\)"):
            RunFolderLock(out).acquire()
        assert main([*SIMULATE, "--out", str(out)]) == 2
        assert "being written by another twinfer run" in capsys.readouterr().err
        assert not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # Once it has let go, the folder is free again, and the lock file is gone with the lock.
    with RunFolderLock(out):
        pass
    assert not (tmp_path / ".run.lock").exists()


def test_the_cli_refuses_a_finished_run_unless_told_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SIMULATE, "--out", str(out)]) == 0
    first = (out / "metadata.json").read_text()
    assert main([*SIMULATE, "--out", str(out), "--time-scale", "2"]) == 2
    assert "holds a run already; pass --overwrite" in capsys.readouterr().err
    assert (out / "metadata.json").read_text() == first
    assert main([*SIMULATE, "--out", str(out), "--time-scale", "2", "--overwrite"]) == 0
    assert (out / "metadata.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock, staging or probe left


def test_run_folders_get_the_umasks_permissions_not_private_ones(tmp_path):
    previous = os.umask(0o022)
    try:
        assert main([*SIMULATE, "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
