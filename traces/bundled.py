"""Small slices of real traces shipped inside the package, so the default run needs no download."""

from __future__ import annotations

import warnings
from pathlib import Path

from traces.errors import TraceWarning

SAMPLES_DIR = Path(__file__).parent / "samples"

BUNDLED = {
    "azure-conv": "azure_conv_2023_head2000.csv",
    "mooncake-conv": "mooncake_conversation_head500.jsonl",
    "demo": "demo_shared_prefix.csv",
}
"""Sample name -> file in traces/samples/ (real ones in their original formats; see samples/README.md)."""


def bundled_trace_path(name: str | Path) -> Path | None:
    """The file of a bundled sample, if `name` is one; None otherwise.

    A bare name is the sample even where a local file or folder has that name (a warning names both); the
    local one is read when written as a path (./demo), so which one a command reads never depends on the
    folder it runs in without saying so."""
    if not isinstance(name, str) or name not in BUNDLED:
        return None
    if Path(name).exists():
        warnings.warn(f"{name!r} is read as the bundled sample {BUNDLED[name]}, not the local {name!r} here; "
                      f"write ./{name} to read the local one", TraceWarning, stacklevel=2)
    return SAMPLES_DIR / BUNDLED[name]
