"""Small slices of real traces shipped inside the package, so the default run needs no download."""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"

BUNDLED = {
    "azure-conv": "azure_conv_2023_head2000.csv",
    "mooncake-conv": "mooncake_conversation_head500.jsonl",
    "demo": "demo_shared_prefix.csv",
}
"""Sample name -> file in traces/samples/ (real ones in their original formats; see samples/README.md)."""


def bundled_trace_path(name: str | Path) -> Path | None:
    """The file of a bundled sample, if `name` is one (and not an existing path); None otherwise."""
    if isinstance(name, str) and name in BUNDLED and not Path(name).exists():
        return SAMPLES_DIR / BUNDLED[name]
    return None
