"""vLLM's result-JSON flags (`--save-result --result-dir --result-filename --save-detailed --metadata
--percentile-metrics --metric-percentiles --label`), shared by every command that writes one."""

from __future__ import annotations

import argparse
from pathlib import Path

from twinfer.result_json import (DEFAULT_PERCENTILE_METRICS, ResultOptions, parse_metadata, parse_metric_percentiles,
                                 parse_percentile_metrics, result_json, result_path, write_result_json)


def add_result_flags(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags, with vLLM's names and defaults; --save-result also takes a file, as twinfer's always did."""
    group = parser.add_argument_group("result JSON (vLLM's `vllm bench serve` flags)")
    group.add_argument("--save-result", nargs="?", const=True, default=None, metavar="FILE",
                       help="write vLLM's result JSON: to FILE, or to --result-dir/--result-filename, else to "
                       "vLLM's default name {label}-{rate}qps-{model}-{date}.json")
    group.add_argument("--result-dir", default=None, help="folder for the result JSON (default: the current one)")
    group.add_argument("--result-filename", default=None,
                       help="file name of the result JSON (default: vLLM's {label}-{rate}qps-{model}-{date}.json)")
    group.add_argument("--save-detailed", action="store_true",
                       help="also save per-request arrays: input_lens, output_lens, ttfts, itls, start_times (s), "
                       "generated_texts where known, errors")
    group.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE",
                       help="key-value pairs saved in the result JSON, e.g. --metadata version=0.3.3 tp=1")
    group.add_argument("--label", default=None, help="the result's label and file-name prefix (default: the backend, "
                       "twinfer-gpu, twinfer-cpu or twinfer-sim)")
    group.add_argument("--percentile-metrics", default=",".join(DEFAULT_PERCENTILE_METRICS),
                       help="comma-separated metrics to report percentiles of: ttft, tpot, itl, e2el")
    group.add_argument("--metric-percentiles", default="99",
                       help="comma-separated percentiles of the selected metrics, e.g. 50,90,99")


def check_result_flags(args: argparse.Namespace) -> None:
    """Parse the flags' values before a run starts, so a typo fails in a second, not after the run."""
    parse_metadata(args.metadata)
    parse_percentile_metrics(args.percentile_metrics)
    parse_metric_percentiles(args.metric_percentiles)
    if (args.result_dir or args.result_filename or args.save_detailed) and not args.save_result:
        raise ValueError("--result-dir, --result-filename and --save-detailed take effect with --save-result")


def wants_result(args: argparse.Namespace) -> bool:
    """Whether a result JSON is asked for."""
    return bool(getattr(args, "save_result", None))


def result_options(args: argparse.Namespace, run, goodput_ms: dict | None) -> ResultOptions:
    """The ResultOptions of these flags for a stored run: backend, model and traffic from its metadata."""
    metadata = run.metadata
    traffic = metadata.get("traffic") or {}
    model = metadata.get("model")
    return ResultOptions(
        # vLLM names a client of an OpenAI-compatible completions endpoint "openai"
        backend="openai" if run.executor_kind == "http" else f"twinfer-{run.executor_kind or 'unknown'}",
        model_id=model,
        tokenizer_id=metadata.get("tokenizer") or model,
        label=args.label,
        request_rate=traffic.get("request_rate"),
        request_rate_source=traffic.get("source", "configured"),
        burstiness=traffic.get("burstiness"),
        max_concurrency=traffic.get("max_concurrency"),
        metadata=parse_metadata(args.metadata),
        percentile_metrics=parse_percentile_metrics(args.percentile_metrics),
        metric_percentiles=parse_metric_percentiles(args.metric_percentiles),
        goodput_ms=goodput_ms,
        save_detailed=args.save_detailed,
    )


def save_result(args: argparse.Namespace, run, goodput_ms: dict | None) -> Path:
    """Write the run's result JSON where the flags say; returns the path."""
    options = result_options(args, run, goodput_ms)
    result = result_json(run.requests, options)
    if isinstance(args.save_result, str):
        if args.result_filename:
            raise ValueError("give the file either to --save-result or to --result-filename, not both")
        path = Path(args.result_dir) / args.save_result if args.result_dir else Path(args.save_result)
    else:
        path = result_path(result, options, result_dir=args.result_dir, result_filename=args.result_filename)
    return write_result_json(result, path)


def traffic_of(args: argparse.Namespace, trace) -> dict:
    """vLLM's traffic fields of a replay: the configured rate and burstiness, else the trace's own mean rate."""
    from traces.arrivals import AllAtOnce, Gamma, Poisson, parse_arrival_process

    spec = getattr(args, "arrivals", None)
    if spec:
        process = parse_arrival_process(spec)
        if isinstance(process, AllAtOnce):
            return {"request_rate": None, "burstiness": 1.0, "source": "configured"}
        burstiness = 1.0 if isinstance(process, Poisson) else 1 / process.cv**2 if isinstance(process, Gamma) else None
        return {"request_rate": process.rate, "burstiness": burstiness, "source": "configured"}
    rate = getattr(args, "request_rate", None)
    if rate is not None:
        return {"request_rate": rate, "burstiness": None, "source": "configured"}
    span = trace.duration
    mean_rate = (len(trace) - 1) / span if span > 0 else None
    return {"request_rate": mean_rate, "burstiness": None, "source": "trace"}
