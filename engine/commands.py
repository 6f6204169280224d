"""What each `twinfer` subcommand does (the argument parser is in engine/cli.py)."""

import argparse
import json
from pathlib import Path

from engine.clock import VirtualClock, WallClock
from engine.config import EngineConfig, default_max_model_len, engine_config_for


# ---- shared pieces


def load_trace(args: argparse.Namespace):
    """Read the trace named on the command line with its trace flags applied, printing what they did."""
    from traces.trace_options import TraceOptions, load_trace as load_with_options

    options = TraceOptions(
        format=args.format,
        max_requests=getattr(args, "max_requests", None),
        arrivals=getattr(args, "arrivals", None),
        time_scale=getattr(args, "time_scale", None),
        request_rate=getattr(args, "request_rate", None),
        duration=getattr(args, "duration", None),
        max_prompt_len=getattr(args, "max_prompt_len", None),
        max_output_len=getattr(args, "max_output_len", None),
        seed=getattr(args, "seed", 0),
    )
    trace = load_with_options(args.trace, options)
    for note in trace.notes:
        print(f"trace {trace.name}: {note}")
    return trace


def engine_config_from(args, model_config, *, gpu_memory_gib: float | None) -> EngineConfig:
    """The EngineConfig for these command-line options and this model."""
    return engine_config_for(
        model_config,
        max_model_len=args.max_model_len or default_max_model_len(model_config.max_position_embeddings),
        gpu_memory_gib=gpu_memory_gib,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens or None,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        num_kv_blocks=args.num_gpu_blocks_override,
        async_scheduling=getattr(args, "async_scheduling", False),
    )


def _print_summary(run_path: Path, goodput, save_result) -> None:
    import gc

    # The engine's millions of objects are still alive: keep the collector from scanning them again.
    gc.freeze()
    try:
        summarize(run_path, goodput, save_result)
    finally:
        gc.unfreeze()


def summarize(run_path, goodput, save_result, percentiles=None) -> None:
    """Print a run's metrics in vLLM's layout, and save them as vLLM-style JSON when asked."""
    from analysis.metrics import compute_metrics
    from analysis.run_store import read_run
    from analysis.summary import DEFAULT_PERCENTILES, parse_goodput, print_summary, save_result_json

    percentiles = percentiles or DEFAULT_PERCENTILES
    run = read_run(run_path)
    metrics = compute_metrics(run, goodput=parse_goodput(goodput) if goodput else None)
    if not run.metadata.get("complete", True):
        statuses = run.requests.column("status").to_pylist()
        print(f"NOTE: {run_path} is an interrupted run: {statuses.count('finished')} of {len(statuses)} requests "
              "finished; the rest are counted as failed")
    print_summary(metrics, percentiles)
    if save_result:
        save_result_json(metrics, save_result, percentiles)
        print(f"result JSON: {save_result}")


def _dtype_name(dtype: str) -> str:
    return "bfloat16" if dtype == "auto" else dtype


def build_simulated_engine(args, *, gpu: str, model: str, profile: str | None, tp: int):
    """An engine whose executor is the cost model (calibrated profile, else roofline) for gpu and model."""
    from engine.cuda_graphs import mixed_step_token_sizes, resolve_mixed_cuda_graphs
    from engine.engine import Engine
    from engine.model_config import load_model_config
    from simulator.executor import CostModelExecutor
    from simulator.gpu_specs import gpu_spec
    from simulator.kv_capacity import estimate_num_kv_blocks
    from simulator.model_shape import ModelShape
    from simulator.profile_library import cost_model_for

    model_config = load_model_config(model)
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % tp or kv_heads % tp:  # the real engine shards both and refuses such a TP at start-up
        raise ValueError(f"tensor_parallel_size {tp} must divide both {model}'s attention heads ({heads}) and "
                         f"its key/value heads ({kv_heads}), as the real engine shards them")
    dtype = _dtype_name(args.dtype)
    cost_model = cost_model_for(gpu, model, tp, dtype, profile_path=profile)
    try:
        spec = gpu_spec(gpu)
    except KeyError:
        if profile is None or args.num_gpu_blocks_override is None:
            raise ValueError(
                f"unknown GPU {gpu!r}: simulating it needs --profile (its calibrated cost model) and "
                "--num-gpu-blocks-override (its KV block count)"
            ) from None
        spec = None
    if spec is not None and tp > spec.gpus_per_host:
        raise ValueError(f"tensor_parallel_size {tp} needs more than one {spec.name} host ({spec.gpus_per_host} GPUs "
                         "each): tensor parallelism runs within one host, as the real engine does")
    config = engine_config_from(
        args, model_config, gpu_memory_gib=spec.memory_bytes / 2**30 if spec is not None else None
    )
    num_blocks = config.num_kv_blocks or estimate_num_kv_blocks(
        spec,
        ModelShape.load(model),
        tp=tp,
        dtype=dtype,
        block_size=config.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
    )
    # The CPU executor has no CUDA graphs: its twin runs every step eagerly, as it does.
    eager = args.enforce_eager or gpu.lower() == "cpu"
    # As the real engine, whose mixed-step graphs need the triton backend ("auto" picks it at the usual
    # block sizes).
    backend = getattr(args, "attention_backend", "auto")
    backend = "triton" if backend == "auto" else backend
    mixed = not eager and resolve_mixed_cuda_graphs(getattr(args, "mixed_cuda_graphs", None), backend, tp)
    mixed_sizes = mixed_step_token_sizes(config.max_num_batched_tokens) if mixed else ()
    executor = CostModelExecutor(cost_model, num_blocks, enforce_eager=eager,
                                 mixed_step_token_sizes=mixed_sizes, max_num_seqs=config.max_num_seqs)
    engine = Engine(config, executor, VirtualClock())
    metadata = {
        "model": model,
        "gpu": spec.name if spec is not None else gpu,
        "profile": cost_model.label,
        "calibrated": bool(cost_model.calibrated),
        "cost_model": cost_model.to_json() if hasattr(cost_model, "to_json") else None,
        "tensor_parallel_size": tp,
        "dtype": dtype,
        "enforce_eager": eager,
        "mixed_cuda_graphs": bool(mixed),
    }
    if not cost_model.calibrated:
        print(f"note: UNCALIBRATED simulation ({cost_model.label}): step times come from an analytic roofline")
    return engine, metadata, model_config.vocab_size


def build_real_engine(args, device: str):
    """An engine over the real model executor on cuda or cpu, with a wall clock."""
    from engine.engine import Engine
    from engine.model_config import load_model_config
    from engine.model_executor import ModelExecutor

    model_config = load_model_config(args.model)
    gpu_memory_gib = None
    if device == "cuda":
        import torch

        gpu_memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    config = engine_config_from(args, model_config, gpu_memory_gib=gpu_memory_gib)
    executor = ModelExecutor(
        args.model,
        config,
        dtype=args.dtype,
        device=device,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        attention_backend=args.attention_backend,
        mixed_cuda_graphs=getattr(args, "mixed_cuda_graphs", None),
        load_format=args.load_format,
        seed=args.seed,
    )
    engine = Engine(config, executor, WallClock())
    metadata = {
        "model": args.model,
        "gpu": _device_name(device),
        "tensor_parallel_size": args.tensor_parallel_size,
        "dtype": args.dtype,
        "enforce_eager": args.enforce_eager,
        "mixed_cuda_graphs": executor.mixed_cuda_graphs,
        "attention_backend": getattr(executor, "attention_backend", args.attention_backend),
    }
    return engine, metadata, model_config.vocab_size


def _device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


# ---- subcommands


def run_replay(args) -> int:
    from traces.replay import replay

    trace = load_trace(args)
    if args.executor == "sim":
        engine, metadata, vocab_size = build_simulated_engine(
            args, gpu=args.gpu, model=args.model, profile=args.profile, tp=args.tensor_parallel_size
        )
    else:
        engine, metadata, vocab_size = build_real_engine(args, "cuda" if args.executor == "gpu" else "cpu")
    try:
        path = replay(
            trace,
            engine,
            args.out,
            executor_kind=args.executor,
            vocab_size=vocab_size,
            seed=args.seed,
            show_progress=not args.no_progress,
            metadata=metadata,
            before_start=getattr(engine.clock, "restart", None),
        )
    finally:
        shutdown = getattr(engine.executor, "shutdown", None)
        if shutdown is not None:
            shutdown()
    print(f"run written to {path}")
    _print_summary(path, args.goodput, args.save_result)
    return 0


def run_simulate(args) -> int:
    if args.replicas > 1:
        from simulator.cluster import simulate_cluster_cli

        return simulate_cluster_cli(args)
    args.executor = "sim"
    return run_replay(args)


def run_summary(args) -> int:
    summarize(args.run, args.goodput, args.save_result, [float(p) for p in args.percentiles.split(",") if p])
    return 0


def step_predictor_of(run):
    """The cost model a simulated run used (kept in its metadata), as a predictor of step-table durations."""
    from simulator.cost_model import CostModel

    data = run.metadata.get("cost_model")
    if not data:
        return None
    cost_model = CostModel.from_json(data, source=f"{run.path}/metadata.json")
    return lambda steps: cost_model.predict_columns({name: steps.column(name).to_numpy() for name in steps.column_names})


def run_compare(args) -> int:
    from analysis.compare import compare_runs
    from analysis.run_store import read_run

    real, simulated = read_run(args.real_run), read_run(args.sim_run)
    comparison = compare_runs(real, simulated, step_predictor=step_predictor_of(simulated))
    print(comparison.format())
    if args.json:
        Path(args.json).write_text(json.dumps(comparison.to_dict(), indent=2))
    return 0


def run_report(args) -> int:
    from analysis.report import build_report
    from analysis.run_store import read_run

    path = build_report([read_run(run) for run in args.runs], args.output, step_predictor_for=step_predictor_of)
    print(f"report written to {path}")
    return 0


def run_profile(args) -> int:
    from simulator.profile import profile_from_args

    print(f"profile written to {profile_from_args(args)}")
    return 0


def run_calibrate(args) -> int:
    from simulator.calibrate import calibrate_cli

    return calibrate_cli(args)


def run_plan(args) -> int:
    from simulator.planner import plan_cli

    return plan_cli(args)


def run_bench(args) -> int:
    from engine.throughput_benchmark import main as throughput

    argv = ["--model", args.model, "--num-seqs", str(args.num_seqs)]
    if args.json:
        argv += ["--out", args.json]
    throughput(argv)
    return 0


def run_demo(args) -> int:
    from engine.demo import demo

    return demo(args.out)
