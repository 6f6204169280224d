"""Real small file systems for tests of full and read-only disks: a tmpfs, where this machine lets a test mount one."""

import os
import subprocess
from pathlib import Path

import pytest


def mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a tmpfs at path with these mount options; False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def full_filesystem(tmp_path):
    """A small tmpfs filled up (the test is skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    if not mount_tmpfs(mount, "size=256k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        yield mount
    finally:
        unmount(mount)


@pytest.fixture
def read_only_filesystem(tmp_path):
    """An empty read-only tmpfs (skipped where mounting is not allowed)."""
    mount = tmp_path / "ro"
    if not mount_tmpfs(mount, "size=1m,ro"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        unmount(mount)
