"""vLLM's benchmark result JSON (`vllm bench serve --save-result`) of a run's requests table.

Field names, order and units follow vLLM 0.19.1's vllm/benchmarks/serve.py: the set-up fields (date,
endpoint_type, backend, label, model_id, tokenizer_id, num_prompts), the --metadata pairs, the traffic
(request_rate, burstiness, max_concurrency), then the metrics: counts and throughputs, and for each selected
metric mean/median/std and the selected percentiles in milliseconds. With save_detailed, vLLM's per-request
arrays follow, in its units: input_lens and output_lens in tokens, ttfts, itls and start_times in seconds.

twinfer adds a few keys of its own after vLLM's (num_rejected, num_aborted, num_unfinished, goodput_slos_ms,
request_rate_source); a parser that reads vLLM's keys ignores them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from analysis.atomic_file import write_text_atomically
from analysis.metrics import Distribution, compute_metrics
from analysis.summary import percentile_word

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
"""Metrics --percentile-metrics may select (vLLM's names)."""
DEFAULT_PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
"""twinfer reports E2EL too by default (vLLM's default for generation is ttft,tpot,itl)."""
DEFAULT_METRIC_PERCENTILES = (99.0,)
DETAILED_FIELDS = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors")
"""vLLM's per-request arrays, kept only with --save-detailed."""


@dataclass(frozen=True)
class ResultOptions:
    """What a result JSON says beyond the run's table: vLLM's set-up, traffic and selection flags."""

    backend: str
    model_id: str | None = None
    tokenizer_id: str | None = None
    label: str | None = None
    request_rate: float | None = None
    """The configured rate (req/s); None: all at once, written "inf" as vLLM does."""
    request_rate_source: str = "configured"
    """'configured' (a flag set it) or 'trace' (the trace's own mean rate, from its arrival times)."""
    burstiness: float | None = 1.0
    """vLLM's gamma shape (1: Poisson); None when arrivals are a trace's recorded times."""
    max_concurrency: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    percentile_metrics: tuple[str, ...] = DEFAULT_PERCENTILE_METRICS
    metric_percentiles: tuple[float, ...] = DEFAULT_METRIC_PERCENTILES
    goodput_ms: dict[str, float] | None = None
    save_detailed: bool = False
    generated_texts: Sequence[str | None] | None = None
    """One text per request in the table's order, where the run knows them."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.percentile_metrics if name not in PERCENTILE_METRICS]
        if unknown or not self.percentile_metrics:
            raise ValueError(f"--percentile-metrics: {', '.join(unknown) or 'nothing'} is not one of "
                             f"{', '.join(PERCENTILE_METRICS)}")
        for p in self.metric_percentiles:
            if not 0 <= p <= 100:
                raise ValueError(f"--metric-percentiles: {p:g} is not within 0..100")


def parse_metadata(items: Iterable[str] | None) -> dict[str, str]:
    """vLLM's --metadata KEY=VALUE pairs (split at the first '='); a pair without '=' is an error."""
    pairs: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--metadata {item!r} is not KEY=VALUE (e.g. --metadata version=0.3.3 tp=1)")
        pairs[key.strip()] = value.strip()
    return pairs


def parse_percentile_metrics(text: str | None) -> tuple[str, ...]:
    """'ttft,tpot' -> ('ttft', 'tpot'); None gives twinfer's default."""
    if text is None:
        return DEFAULT_PERCENTILE_METRICS
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in PERCENTILE_METRICS]
    if unknown or not names:
        raise ValueError(f"--percentile-metrics {text!r}: expected a comma-separated list of "
                         f"{', '.join(PERCENTILE_METRICS)}")
    return names


def parse_metric_percentiles(text: str | None) -> tuple[float, ...]:
    """'50,90,99' -> (50.0, 90.0, 99.0); each within 0..100."""
    if text is None:
        return DEFAULT_METRIC_PERCENTILES
    values = []
    for part in filter(None, (part.strip() for part in str(text).split(","))):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--metric-percentiles: {part!r} is not a number (e.g. 50,90,99)") from None
        if not 0 <= value <= 100 or not math.isfinite(value):
            raise ValueError(f"--metric-percentiles: {part} is not within 0..100")
        values.append(value)
    if not values:
        raise ValueError("--metric-percentiles is empty (e.g. 50,90,99)")
    return tuple(dict.fromkeys(values))


def result_json(requests: pa.Table, options: ResultOptions, *, date: datetime.datetime | None = None) -> dict:
    """The result dict of a run's requests table, in vLLM's field order; metrics in ms, as vLLM's."""
    date = date or datetime.datetime.now()
    metrics = compute_metrics(requests, goodput=options.goodput_ms or None)
    result: dict = {
        "date": date.strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": options.backend,
        "backend": options.backend,
        "label": options.label,
        "model_id": options.model_id,
        "tokenizer_id": options.tokenizer_id,
        "num_prompts": requests.num_rows,
    }
    result.update(options.metadata)
    result.update({
        "request_rate": "inf" if options.request_rate is None else options.request_rate,
        "burstiness": options.burstiness,
        "max_concurrency": options.max_concurrency,
        "duration": metrics.duration,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input_tokens,
        "total_output_tokens": metrics.total_output_tokens,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput if options.goodput_ms else None,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
    })
    if options.save_detailed:
        result.update(_detailed(requests, options.generated_texts))
    result["max_output_tokens_per_s"] = metrics.max_output_tokens_per_s
    result["max_concurrent_requests"] = metrics.max_concurrent_requests
    for name in PERCENTILE_METRICS:
        if name not in options.percentile_metrics:
            continue
        distribution: Distribution = getattr(metrics, name)
        result[f"mean_{name}_ms"] = distribution.mean * 1000
        result[f"median_{name}_ms"] = distribution.median * 1000
        result[f"std_{name}_ms"] = distribution.std * 1000
        for p in options.metric_percentiles:
            result[f"p{percentile_word(p)}_{name}_ms"] = distribution.percentile(p) * 1000
    result.update({
        "num_rejected": metrics.num_rejected,
        "num_aborted": metrics.num_aborted,
        "num_unfinished": metrics.num_unfinished,
        "goodput_slos_ms": metrics.goodput_slos_ms,
        "request_rate_source": options.request_rate_source,
    })
    return {key: _finite(value) for key, value in result.items()}


def _detailed(requests: pa.Table, generated_texts) -> dict:
    """vLLM's per-request arrays, in arrival order: a failed request has output 0, TTFT 0 and no ITLs, as in
    vLLM (its RequestFuncOutput defaults), and its reason in errors; a finished one an empty error."""
    arrival = requests.column("arrival_time").to_numpy(zero_copy_only=False)
    order = np.argsort(arrival, kind="stable")
    rows = requests.take(pa.array(order)).to_pydict()
    texts = list(generated_texts) if generated_texts is not None else [None] * requests.num_rows
    if len(texts) != requests.num_rows:
        raise ValueError(f"generated_texts has {len(texts)} entries for {requests.num_rows} requests")
    texts = [texts[i] for i in order]
    detailed: dict[str, list] = {name: [] for name in DETAILED_FIELDS}
    for index, status in enumerate(rows["status"]):
        finished = status == "finished"
        token_times = rows["token_times"][index] or []
        detailed["input_lens"].append(rows["prompt_len"][index])
        detailed["output_lens"].append(rows["output_len"][index] if finished else 0)
        detailed["ttfts"].append(rows["ttft"][index] if finished and rows["ttft"][index] is not None else 0.0)
        detailed["itls"].append(list(np.diff(token_times)) if finished else [])
        detailed["start_times"].append(rows["arrival_time"][index])
        detailed["generated_texts"].append(texts[index] if finished else None)
        detailed["errors"].append("" if finished else f"{status}: {rows['reason'][index]}")
    detailed["itls"] = [[float(gap) for gap in gaps] for gaps in detailed["itls"]]
    return detailed


def _finite(value):
    """JSON has no NaN or infinity: such a value is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_file_name(result: dict, options: ResultOptions) -> str:
    """vLLM's default file name: {label or backend}-{rate}qps[-concurrency{N}]-{model base name}-{date}.json."""
    rate = "inf" if options.request_rate is None else options.request_rate
    if options.request_rate_source == "trace" and options.request_rate is not None:
        rate = f"{options.request_rate:.3g}"  # a measured mean rate: its full digits would only clutter the name
    concurrency = f"-concurrency{options.max_concurrency}" if options.max_concurrency is not None else ""
    model = str(options.model_id or "model").rstrip("/").split("/")[-1]
    return f"{options.label or options.backend}-{rate}qps{concurrency}-{model}-{result['date']}.json"


def result_path(result: dict, options: ResultOptions, *, result_dir: str | None = None,
                result_filename: str | None = None) -> Path:
    """Where vLLM would write the result: --result-filename (else its default name) inside --result-dir."""
    name = result_filename or result_file_name(result, options)
    return Path(result_dir) / name if result_dir else Path(name)


def write_result_json(result: dict, path: str | os.PathLike) -> Path:
    """Write the result as JSON (atomically: a reader never sees half a file); the folder is made if needed."""
    return write_text_atomically(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
