"""A trace's requests as engines take them: ids, arrival times, prompt token ids and sampling parameters.

Made once per trace and shared by every rescaled copy and window of it, so a planner probing many request
rates, and every replica of a cluster, pays for the token ids once. A replay that reads the trace once makes
them lazily instead, a batch at a time as the requests are added, so its memory does not grow with the trace.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analysis.run_store import trace_fingerprint
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from traces.schema import Trace
from traces.tokens import trace_prompt_token_ids


@lru_cache(maxsize=None)
def trace_sampling_params(output_len: int) -> SamplingParams:
    """A trace request's sampling: greedy, EOS ignored, ending at the trace's output length (at least 1).

    One frozen SamplingParams per length, shared by every request of that length.
    """
    return SamplingParams(temperature=0.0, max_tokens=max(int(output_len), 1), ignore_eos=True)


class LazyPromptTokens:
    """Prompt token ids made as they are read, in order (a replay adds its requests in arrival order): only the
    batch being read is in memory. Reading an earlier request again raises."""

    def __init__(self, tokens: Iterator[np.ndarray | None], count: int) -> None:
        self._tokens = tokens
        self._count = count
        self._next = 0
        self._last: np.ndarray | None = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> np.ndarray | None:
        if not 0 <= index < self._count:
            raise IndexError(f"request {index} out of range")
        if index == self._next - 1:
            return self._last
        if index < self._next:
            raise IndexError(f"request {index} was read already: lazily made token ids are read in order")
        while self._next <= index:
            self._last = next(self._tokens)
            self._next += 1
        return self._last


class RequestIds(Sequence[str]):
    """A trace's request ids, kept in their Arrow column: a tuple of millions of Python strings would cost
    about 65 bytes each, ten times the column's."""

    def __init__(self, column: pa.Array | pa.ChunkedArray) -> None:
        self._column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._column))
            if step != 1:
                raise ValueError("request ids are sliced with step 1 only")
            return RequestIds(self._column.slice(start, max(stop - start, 0)))
        return self._column[index].as_py()

    def __iter__(self):
        for start in range(0, len(self._column), 1 << 16):
            yield from self._column.slice(start, 1 << 16).to_pylist()

    def __eq__(self, other) -> bool:
        if isinstance(other, RequestIds):
            return self._column.equals(other._column)
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"RequestIds({len(self)} ids)"


@dataclass(frozen=True)
class TraceRequests:
    """A trace's requests: ids, arrival times, prompt token ids (int32 arrays) and output lengths."""

    name: str
    request_ids: Sequence[str]
    arrival_times: np.ndarray
    prompt_token_ids: Sequence[np.ndarray | None]
    """None for a request longer than the max_prompt_len given to from_trace: the engine rejects it by length."""
    output_lens: np.ndarray
    fingerprint: str = ""
    reference_rate: float | None = None
    """The mean rate that at_rate() rescales from (None: these requests' own). A window of a trace keeps the
    whole trace's, so a rate means the same arrivals as for the whole trace."""
    prompt_lens: np.ndarray | None = None
    """Each request's prompt length (None: the lengths of prompt_token_ids)."""

    @classmethod
    def from_trace(cls, trace: Trace, *, vocab_size: int, seed: int = 0, max_prompt_len: int | None = None,
                   lazy: bool = False, token_contents: bool = True) -> "TraceRequests":
        """The trace's requests, their token ids made from the trace's lengths and prefix ids (traces.tokens).

        Prompts longer than max_prompt_len (an engine's max_model_len: it can never serve them) get no token ids,
        so a trace's sizes are checked before anything is allocated for them. lazy: token ids made as they are
        read, in order (a replay); else all at once (the planner reads them many times, in windows).
        token_contents False: for engines that read only the prompts' lengths (a simulation without prefix
        caching, behind no router), prompts of zeros, unless the trace carries its own token ids (checked then).
        """
        table = trace.table
        ids = table.column("request_id")
        if pc.count_distinct(ids).as_py() != len(ids):  # a run has one row per request, found by its id
            counts = pc.value_counts(ids)
            repeated = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
            raise ValueError(f"trace {trace.name!r}: request id {repeated!r} appears more than once")
        if token_contents or table.column("prompt_token_ids").null_count < table.num_rows:
            tokens = trace_prompt_token_ids(trace, vocab_size=vocab_size, seed=seed, max_prompt_len=max_prompt_len)
        else:
            tokens = _zero_prompts(table.column("prompt_len").to_numpy(), max_prompt_len)
        return cls(
            name=trace.name,
            request_ids=RequestIds(table.column("request_id")),
            arrival_times=table.column("arrival_time").to_numpy().astype(np.float64),
            prompt_token_ids=LazyPromptTokens(tokens, table.num_rows) if lazy else tuple(tokens),
            output_lens=table.column("output_len").to_numpy().astype(np.int64),
            fingerprint=trace_fingerprint(table),
            prompt_lens=table.column("prompt_len").to_numpy().astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.request_ids)

    def prompt_len(self, index: int) -> int:
        """Request `index`'s prompt length."""
        if self.prompt_lens is not None:
            return int(self.prompt_lens[index])
        return len(self.prompt_token_ids[index])

    def add(self, engine: Engine, index: int) -> None:
        """Queue request `index` on the engine at its arrival time: greedy, ending at its output length."""
        tokens = self.prompt_token_ids[index]
        engine.add_request(
            prompt_token_ids=tokens,  # an int array: the engine keeps it as one
            # Too long to have token ids: the engine rejects it by its length, making none.
            prompt_len=self.prompt_len(index) if tokens is None else None,
            sampling_params=trace_sampling_params(int(self.output_lens[index])),
            arrival_time=float(self.arrival_times[index]),
            request_id=self.request_ids[index],
        )

    @property
    def mean_rate(self) -> float:
        """(requests - 1) / span of arrivals, as traces.transforms.with_request_rate defines it."""
        span = float(self.arrival_times[-1] - self.arrival_times[0]) if len(self) else 0.0
        return (len(self) - 1) / span if span > 0 else float("inf")

    def window(self, start: int, count: int) -> "TraceRequests":
        """`count` consecutive requests from position `start`, arrivals shifted to start at 0; at_rate()
        scales them as it would scale the whole trace."""
        stop = min(start + count, len(self))
        if start == 0 and stop == len(self):
            return self
        arrivals = self.arrival_times[start:stop]
        return dataclasses.replace(
            self,
            request_ids=self.request_ids[start:stop],
            arrival_times=arrivals - arrivals[0],
            prompt_token_ids=self.prompt_token_ids[start:stop],
            output_lens=self.output_lens[start:stop],
            prompt_lens=None if self.prompt_lens is None else self.prompt_lens[start:stop],
            fingerprint=f"{self.fingerprint}[{start}:{stop}]",
            reference_rate=self._reference_rate,
        )

    def busiest_window(self, count: int) -> "TraceRequests":
        """The `count` consecutive requests arriving fastest: where a trace is hardest to serve."""
        if count >= len(self):
            return self
        spans = self.arrival_times[count - 1:] - self.arrival_times[: len(self) - count + 1]
        return self.window(int(np.argmin(spans)), count)

    @property
    def _reference_rate(self) -> float:
        return self.reference_rate if self.reference_rate is not None else self.mean_rate

    def at_rate(self, rate: float) -> "TraceRequests":
        """Arrival times scaled so the mean rate is `rate` requests/s (with_request_rate's rule); for a
        window, so that the whole trace's mean rate would be `rate`."""
        if not rate > 0 or not np.isfinite(rate):
            raise ValueError(f"request rate must be a positive number, got {rate!r}")
        current = self._reference_rate
        if not np.isfinite(current):
            raise ValueError(f"{self.name}: {len(self)} requests with no time span cannot be set to a rate")
        return dataclasses.replace(self, arrival_times=self.arrival_times * (current / rate))


def _zero_prompts(prompt_lens: np.ndarray, max_prompt_len: int | None) -> Iterator[np.ndarray | None]:
    """Prompts of zeros, of the trace's lengths (None beyond max_prompt_len, as trace_prompt_token_ids gives)."""
    for length in prompt_lens.tolist():
        yield None if max_prompt_len is not None and length > max_prompt_len else np.zeros(length, dtype=np.int32)


def add_trace_requests(engine: Engine, trace: Trace, *, vocab_size: int, seed: int = 0) -> int:
    """Queue every trace request on one engine (ends at its output length, EOS ignored); returns the count."""
    requests = TraceRequests.from_trace(trace, vocab_size=vocab_size, seed=seed, lazy=True,
                                        max_prompt_len=engine.config.max_model_len)
    for index in range(len(requests)):
        requests.add(engine, index)
    return len(requests)
