"""`twinfer replay`: a trace through an executor (GPU, CPU or the cost model) at its arrival times."""

import argparse
import time

from twinfer.cli.options import (add_engine_options, add_output_options, add_trace_options, check_output_flags,
                                 engine_args_from, load_trace, print_run_summary)
from twinfer.cli.cuda_required import require_cuda
from twinfer.cli.result_flags import traffic_of

DEVICES = {"gpu": "cuda", "cpu": "cpu"}


def register(commands) -> None:
    parser = commands.add_parser("replay", help="replay a trace through an executor at its arrival times")
    add_trace_options(parser)
    parser.add_argument("--executor", choices=["gpu", "cpu", "sim"], default="gpu",
                        help="gpu: the model on CUDA; cpu: the model on this CPU; sim: the cost model")
    parser.add_argument("--model", required=True, help="HF model folder or preset name")
    parser.add_argument("--gpu", default="h100", help="for --executor sim: the GPU simulated")
    parser.add_argument("--profile", default=None,
                        help="a calibrated profile (JSON) or an operator profile (Parquet, composed); default: the "
                        "bundled calibrated profile, else the GPU's bundled operator profile, else the roofline")
    parser.add_argument("--cost-model", default="auto", choices=["auto", "calibrated", "composed", "roofline"],
                        help="force one kind of cost model (default: auto, in the order of --profile's help)")
    add_engine_options(parser)
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    return replay_trace(args, args.executor)


def replay_trace(args: argparse.Namespace, executor: str, replicas: int = 1, router: str | None = None) -> int:
    """Replay the trace on one engine of this executor, or on simulated replicas behind the router; write the
    run and print its summary. `twinfer replay` and `twinfer simulate` both come here.

    Every setting is checked before any work (the SLOs and result flags, the engine's sizes, CUDA, the output
    folder), and --out is locked against other runs; SIGTERM is handled as Ctrl-C: the finished part is written,
    marked incomplete, and the exit status is 128 + the signal's number."""
    from analysis.run_output import RunFolderLock, check_out_dir
    from analysis.summary import parse_goodput
    from engine.executor import ShutdownExecutor
    from simulator.cluster import build_replicas
    from simulator.router import make_router
    from simulator.simulated_engine import build_simulated_engine
    from twinfer.interrupts import signal_of, signals_as_interrupts
    from twinfer.replay import replay
    from twinfer.result_json import parse_metric_percentiles

    check_output_flags(args)
    if executor == "gpu":
        require_cuda("--executor gpu", "use --executor cpu (the real model on this CPU) or --executor sim (the "
                     "simulator)")
    engine_args = engine_args_from(args, device=DEVICES.get(executor))
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas must be a positive integer, got {replicas!r}")
    check_out_dir(args.out, overwrite=args.overwrite)
    with RunFolderLock(args.out), signals_as_interrupts():
        check_out_dir(args.out, overwrite=args.overwrite)  # again, now that no other run can change it
        trace = load_trace(args)
        built: list[dict] = []

        def build_one():
            if executor == "sim":
                engine, metadata = build_simulated_engine(
                    engine_args, gpu=args.gpu, profile=args.profile,
                    cost_model_kind=None if args.cost_model == "auto" else args.cost_model)
            else:
                engine, metadata = real_engine_and_metadata(engine_args)
            built.append({**metadata, "traffic": traffic_of(args, trace)})
            return engine

        engines = build_replicas(build_one, replicas)
        try:
            result = replay(
                trace,
                engines,
                args.out,
                executor_kind=executor,
                router=make_router(router, block_size=engine_args.block_size) if replicas > 1 else None,
                seed=args.seed,
                show_progress=not args.no_progress,
                metadata=built[0],
                goodput=parse_goodput(args.goodput) if args.goodput else None,
                percentiles=parse_metric_percentiles(args.metric_percentiles),
            )
        finally:
            for engine in engines:
                if isinstance(engine.executor, ShutdownExecutor):
                    engine.executor.shutdown()
        print(f"run written to {result.path}")
        print_run_summary(result, args)
        if executor == "sim":
            print(simulation_speed(result.metrics.duration))
    if result.interrupt is not None:
        return 128 + signal_of(result.interrupt)
    return 0


def simulation_speed(simulated_seconds: float) -> str:
    """How fast the simulator ran: the run's simulated span against the command's wall-clock time so far, start-up,
    trace reading and writing included."""
    from twinfer.cli import STARTED

    wall = time.perf_counter() - STARTED
    return (f"simulated {simulated_seconds:,.1f} s of serving in {wall:,.2f} s wall-clock, start-up included: "
            f"{simulated_seconds / wall:,.0f}x real time")


def real_engine_and_metadata(engine_args):
    """An engine over the real model executor (engine.engine_args.build_real_engine), and what its run records."""
    from engine.engine_args import build_real_engine

    engine = build_real_engine(engine_args)
    metadata = {
        "model": engine_args.model,
        "gpu": _device_name(engine_args.device),
        "tensor_parallel_size": engine_args.tensor_parallel_size,
        "dtype": engine_args.dtype,
        "enforce_eager": engine_args.enforce_eager,
        "mixed_cuda_graphs": engine.executor.mixed_cuda_graphs,
        "attention_backend": engine.executor.attention_backend,
    }
    return engine, metadata


def _device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)
