"""Writing a file whole or not at all: a reader never finds half of it, and a failed write (a full disk, an
interrupt) leaves neither a truncated file nor a stray temporary behind."""

import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write data to path through a temporary sibling, synced and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file private (0600); the result gets what any new file would (the umask's).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """write_bytes_atomically of text as UTF-8."""
    return write_bytes_atomically(path, text.encode("utf-8"))
