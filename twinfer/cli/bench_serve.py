"""`twinfer bench serve TRACE --base-url URL --model NAME`: a trace replayed at its arrival times against any
OpenAI-compatible server (twinfer serve, vLLM, SGLang), written as a run in twinfer's schema."""

import argparse
import math
import os

from twinfer.cli.options import add_output_options, check_output_flags, summarize
from twinfer.cli.result_flags import traffic_of


def register(which) -> None:
    parser = which.add_parser(
        "serve", help="replay a trace against an OpenAI-compatible server",
        description="Replay TRACE against an OpenAI-compatible /v1/completions endpoint at the trace's arrival times "
                    "(or at --request-rate), streaming to time every token, and write the run (executor http) "
                    "for summary, compare and report. Prompts are sent as token ids made as an in-process replay "
                    "makes them (same --seed and vocabulary), greedy, EOS ignored, max_tokens the trace's output "
                    "length.")
    parser.add_argument("trace", help="a trace file (any format twinfer reads), a bundled sample or a workload spec")
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the model name the server serves")
    parser.add_argument("--endpoint", default="/v1/completions", help="default: %(default)s")
    parser.add_argument("--api-key", default=None, help="sent as a bearer token (default: $OPENAI_API_KEY when set)")
    parser.add_argument("--tokenizer", default=None,
                        help="a model folder or preset whose vocabulary the prompt token ids come from (default: "
                             "--model, when it names one)")
    parser.add_argument("--vocab-size", type=int, default=None, help="the vocabulary size, instead of --tokenizer")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="at most this many requests open at once; the others wait (default: no limit)")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="client processes sending the requests, each on an event loop of its own; request i "
                             "goes to worker i mod N (default: %(default)s, one process as vLLM's bench). One loop "
                             "reads a chunk of every open stream each engine step, and a new request's first token "
                             "waits behind them: with tens of streams and short steps use more, up to the cores the "
                             "server leaves free. --max-concurrency is split over them")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="replace the trace's arrival times by a gamma process at this many requests/s, as "
                             "vLLM's (inf: all at once; default: the trace's own times)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="the gamma shape with --request-rate: 1 is Poisson, lower is burstier (vLLM's)")
    parser.add_argument("--format", default=None, help="trace format (default: detected from the columns)")
    parser.add_argument("--time-scale", type=float, default=None, help="multiply inter-arrival times by this")
    parser.add_argument("--max-requests", type=int, default=None, help="keep the first N requests")
    parser.add_argument("--duration", type=float, default=None, help="keep requests arriving in the first S seconds")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="clip prompt lengths (reported)")
    parser.add_argument("--max-output-len", type=int, default=None, help="clip output lengths (reported)")
    parser.add_argument("--seed", type=int, default=0, help="prompt token ids and arrivals (default: %(default)s)")
    add_output_options(parser)


def arrival_spec(request_rate: float | None, burstiness: float) -> str | None:
    """The trace arrival process of vLLM's --request-rate and --burstiness (gamma, shape = burstiness)."""
    if not (isinstance(burstiness, (int, float)) and math.isfinite(burstiness) and burstiness > 0):
        raise ValueError(f"--burstiness must be a positive number, got {burstiness!r}")
    if request_rate is None:
        if burstiness != 1.0:
            raise ValueError("--burstiness shapes the arrivals of --request-rate: give a request rate too")
        return None
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be positive (or inf), got {request_rate!r}")
    if math.isinf(request_rate):
        return "all-at-once"
    if burstiness == 1.0:
        return f"poisson:{request_rate!r}"
    return f"gamma:{request_rate!r}:{1 / math.sqrt(burstiness)!r}"


def vocab_size_of(args: argparse.Namespace) -> int:
    """--vocab-size, else the vocabulary of --tokenizer or --model when one names a model folder or preset."""
    if args.vocab_size is not None:
        if args.vocab_size < 1:
            raise ValueError(f"--vocab-size must be a positive integer, got {args.vocab_size}")
        return args.vocab_size
    from engine.model_config import load_model_config

    source = args.tokenizer or args.model
    try:
        return load_model_config(source).vocab_size
    except (FileNotFoundError, ValueError, OSError) as error:
        raise ValueError(f"cannot tell the vocabulary of {source!r} ({error}); give --tokenizer (a model folder "
                         "or preset) or --vocab-size") from None


def run(args: argparse.Namespace) -> int:
    from traces.trace_options import TraceOptions, load_trace
    from twinfer.serving.bench_serve import BenchServeOptions, bench_serve

    if args.request_rate is not None and args.time_scale is not None:
        raise ValueError("give either --request-rate or --time-scale, not both")
    from analysis.run_output import RunFolderLock, check_out_dir

    check_output_flags(args)
    check_out_dir(args.out, overwrite=args.overwrite)
    options = BenchServeOptions(
        base_url=args.base_url, model=args.model, endpoint=args.endpoint,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None, max_concurrency=args.max_concurrency,
        request_rate=args.request_rate, burstiness=args.burstiness, show_progress=not args.no_progress,
        num_workers=args.num_workers)
    vocab_size = vocab_size_of(args)
    trace = load_trace(args.trace, TraceOptions(
        format=args.format, max_requests=args.max_requests, arrivals=arrival_spec(args.request_rate, args.burstiness),
        time_scale=args.time_scale, duration=args.duration, max_prompt_len=args.max_prompt_len,
        max_output_len=args.max_output_len, seed=args.seed))
    for note in trace.notes:
        print(f"trace {trace.name}: {note}")
    traffic = {**traffic_of(args, trace), "max_concurrency": args.max_concurrency}
    if args.request_rate is not None:
        traffic["burstiness"] = args.burstiness
        if math.isinf(args.request_rate):
            traffic["request_rate"] = None  # all at once: the result JSON's "inf"
    with RunFolderLock(args.out):
        check_out_dir(args.out, overwrite=args.overwrite)
        path = bench_serve(trace, options, args.out, vocab_size=vocab_size, seed=args.seed,
                           metadata={"traffic": traffic})
        print(f"run written to {path}")
        summarize(path, args)
    return 0
