"""A trace's requests as an engine takes them: prompt token ids, arrival times and sampling parameters."""

from engine.engine import Engine
from engine.sampling_params import SamplingParams
from traces.schema import Trace
from traces.tokens import trace_prompt_token_ids


def trace_sampling_params(output_len: int) -> SamplingParams:
    """A trace request's sampling: greedy, EOS ignored, ending at the trace's output length (at least 1)."""
    return SamplingParams(temperature=0.0, max_tokens=max(int(output_len), 1), ignore_eos=True)


def add_trace_requests(engine: Engine, trace: Trace, *, vocab_size: int, seed: int = 0) -> int:
    """Queue every trace request on the engine (ends at its output length, EOS ignored); returns the count."""
    table = trace.table
    token_ids = trace_prompt_token_ids(trace, vocab_size=vocab_size, seed=seed)
    request_ids = table.column("request_id").to_pylist()
    arrivals = table.column("arrival_time").to_pylist()
    output_lens = table.column("output_len").to_pylist()
    for request_id, arrival, prompt, output_len in zip(request_ids, arrivals, token_ids, output_lens):
        engine.add_request(
            prompt_token_ids=prompt,  # an int array: the engine keeps it as one, no list of ints
            sampling_params=trace_sampling_params(output_len),
            arrival_time=float(arrival),
            request_id=request_id,
        )
    return len(request_ids)
