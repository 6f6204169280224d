"""The trace table every reader produces and every replay consumes."""

from dataclasses import dataclass, field

import pyarrow as pa

TRACE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("arrival_time", pa.float64(), nullable=False),
        pa.field("prompt_len", pa.int64(), nullable=False),
        pa.field("output_len", pa.int64(), nullable=False),
        pa.field("prefix_block_ids", pa.list_(pa.int64())),
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("session_id", pa.string()),
    ]
)
"""arrival_time is seconds from the trace's start, sorted ascending.
prefix_block_ids: ids of the trace's hash blocks (hash_block_size tokens each); equal ids mean equal tokens.
prompt_token_ids: real token ids when the trace has them (then prompt_len == len(prompt_token_ids))."""


@dataclass(frozen=True)
class Trace:
    """A validated trace table plus where it came from."""

    table: pa.Table
    name: str
    source_format: str
    hash_block_size: int = 512
    notes: list[str] = field(default_factory=list)
    """Things the reader reported: rows left out and why, timestamps sorted, lengths clipped."""

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def duration(self) -> float:
        """Seconds from the first to the last arrival."""
        if self.table.num_rows == 0:
            return 0.0
        arrivals = self.table.column("arrival_time")
        return float(arrivals[-1].as_py() - arrivals[0].as_py())
