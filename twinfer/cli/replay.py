"""`twinfer replay`: a trace through an executor (GPU, CPU or the cost model) at its arrival times."""

import argparse

from twinfer.cli.options import (add_engine_options, add_output_options, add_trace_options, load_trace,
                                 print_run_summary)


def register(commands) -> None:
    parser = commands.add_parser("replay", help="replay a trace through an executor at its arrival times")
    add_trace_options(parser)
    parser.add_argument("--executor", choices=["gpu", "cpu", "sim"], default="gpu")
    parser.add_argument("--model", required=True, help="HF model folder or preset name")
    parser.add_argument("--gpu", default="h100", help="for --executor sim: the GPU simulated")
    parser.add_argument("--profile", default=None, help="for --executor sim: a calibrated profile (JSON)")
    add_engine_options(parser)
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from engine.executor import ShutdownExecutor
    from simulator.simulated_engine import build_simulated_engine
    from twinfer.replay import replay

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
        if isinstance(engine.executor, ShutdownExecutor):
            engine.executor.shutdown()
    print(f"run written to {path}")
    print_run_summary(path, args.goodput, args.save_result)
    return 0


def build_real_engine(args, device: str):
    """An engine over the real model executor on cuda or cpu, with a wall clock."""
    from engine.clock import WallClock
    from engine.engine import Engine
    from engine.model_config import load_model_config
    from engine.model_executor import ModelExecutor
    from simulator.simulated_engine import engine_config_from

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
