"""Where a run goes: the output folder checked before any work, and locked while one run writes it.

A run folder is only ever replaced whole (analysis.run_store writes into a staging sibling and renames), so the
checks here are about the user's intent and the machine: an existing run is replaced only when asked
(--overwrite), a folder of other files never; the folder must be creatable and writable, with room for a
minimal write; and two runs never write one folder at once (the second is refused while the first holds an
exclusive lock, a file beside the folder, as git's index.lock refuses a second writer).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from analysis.run_store import REQUESTS_FILE, RUN_FILES

PROBE_BYTES = 1 << 16
"""A minimal write: the probe that tells a full or read-only file system before the run, not after."""


class RunOutputError(ValueError):
    """The output folder cannot take this run; the message says why and what to do, in one line."""


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """out_dir checked before any work: not empty, not a file, not a folder of other files, a finished run only
    with overwrite, and a writable file system with room for a minimal write."""
    if not str(out_dir).strip():
        raise RunOutputError("--out is empty: name the run folder to write")
    path = Path(out_dir)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise RunOutputError(f"--out {path} exists and is not a folder; choose a new folder name")
        entries = sorted(entry.name for entry in path.iterdir())
        if (path / REQUESTS_FILE).is_file():
            if not overwrite:
                raise RunOutputError(f"--out {path} holds a run already; pass --overwrite to replace it, or choose "
                                     "another folder")
        elif entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise RunOutputError(f"--out {path} is a folder of other files ({shown}), not a run folder "
                                 f"({', '.join(RUN_FILES)}); choose an empty or new folder")
    existing = path.parent
    while not existing.exists():
        if existing.is_symlink():
            raise RunOutputError(f"--out {path}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise RunOutputError(f"--out {path}: {existing} is a file, not a folder")
    _probe_write(existing, path)
    return path


def _probe_write(folder: Path, out_dir: Path) -> None:
    """Write, sync and remove PROBE_BYTES in folder (where the run's staging folder will be made)."""
    probe = folder / f".{out_dir.name or 'run'}.probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = memoryview(b"\0" * PROBE_BYTES)
            while data:  # a nearly full disk takes part of a write without an error: the next part fails
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise RunOutputError(f"--out {out_dir}: cannot write in {folder}: {_why(error)}") from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def _why(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    if error.errno == errno.EROFS:
        return "the file system is read-only"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if error.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return error.strerror or str(error)


class RunFolderLock:
    """An exclusive lock on one run folder (its lock file `.NAME.lock` beside it, holding the owner's pid),
    taken before any work and released once the run is written; a second taker is refused at once."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir.parent / f".{self.out_dir.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        """Take the lock or raise RunOutputError naming the run holding it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunOutputError(f"--out {self.out_dir}: cannot make {self.path.parent}: {_why(error)}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise RunOutputError(f"--out {self.out_dir}: cannot make its lock file: {_why(error)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunOutputError(f"--out {self.out_dir} is being written by another twinfer run (pid {owner}); "
                                     "wait for it to end or choose another folder") from None
            # The holder before us unlinks the file before letting go: if it did since we opened it, ours is
            # a lock on a name nobody else sees, so start again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go (the lock file is removed)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
