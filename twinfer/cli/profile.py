"""`twinfer profile`: time the real executor over a grid of batch shapes of one model, or with --operators the
operators a step is made of, for the composed cost model of any model (on a GPU)."""

import argparse
import json
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser("profile", help="time the real executor over a grid of batch shapes, or its "
                                  "operators (--operators) for the composed cost model (GPU)")
    parser.add_argument("--operators", action="store_true",
                        help="time the operators of a step for every supported model family (no --model)")
    parser.add_argument("--tables", default=None,
                        help="with --operators: only these operator tables, comma-separated (default: all)")
    parser.add_argument("--update", default=None, metavar="PROFILE",
                        help="with --operators: write PROFILE with the tables timed now (or --merge's) replacing "
                        "its own, to --out")
    parser.add_argument("--merge", default=None, metavar="TIMED",
                        help="with --update: take the replacing tables from this operator profile instead of timing")
    parser.add_argument("--quick", action="store_true", help="with --operators: tiny grids, a check that all runs")
    parser.add_argument("--model", default=None, help="preset name or model folder (dummy weights are used)")
    parser.add_argument("--out", required=True, help="Parquet file to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 (float32 for --operators on a CPU)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="total time budget, setup included (default: 480, or 420 with --operators)")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each shape")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's, capped at 32768")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="largest step of the grid, in tokens")
    parser.add_argument("--max-num-seqs", type=int, default=1024, help="largest decode batch of the grid")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory the engine "
                        "may use")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--device", default=None, help="default: cuda (for --operators: cuda when there is a GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dummy weights and tokens")
    parser.add_argument("--max-shapes", type=int, default=None, help="stop after this many grid shapes (a quick check)")
    parser.add_argument("--fit-out", help="also fit a cost model and write its JSON here")
    parser.add_argument("--serving-seconds", type=float, default=0.0,
                        help="end with this long a serving phase (part of --max-seconds): steps of the real engine "
                        "serving Poisson arrivals, from which calibration learns the serving loop's eager-step cost")
    parser.add_argument("--serving-rate", type=float, default=20.0, help="requests/s in the serving phase")
    parser.add_argument("--mixed-cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="profile the engine with this option (default: the engine's; when on at TP 1, each "
                        "shape with a prompt chunk is also timed eagerly, so the fit predicts both)")


def run(args: argparse.Namespace) -> int:
    """Profile; with --fit-out also fit a cost model to the profile and save it."""
    if args.operators:
        return _operators(args)
    if args.model is None:
        raise ValueError("--model is required (or --operators for the operator profile)")
    device = args.device or "cuda"
    if device.startswith("cuda"):
        from twinfer.cli.cuda_required import require_cuda

        require_cuda("`twinfer profile`", "profile this CPU with --device cpu, or --operators (which uses the CPU "
                     "when there is no GPU)")
    import pyarrow.parquet as pq

    from simulator.profile import profile

    path = profile(
        args.model,
        args.out,
        tp=args.tp,
        dtype=args.dtype or "bfloat16",
        max_seconds=args.max_seconds or 480,
        repeats=args.repeats,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        device=device,
        seed=args.seed,
        max_shapes=args.max_shapes,
        serving_seconds=args.serving_seconds,
        serving_rate=args.serving_rate,
        mixed_cuda_graphs=args.mixed_cuda_graphs,
    )
    if args.fit_out:
        from simulator.calibrate import fit_profile_table
        from simulator.calibration_quality import warn_if_poor

        calibration = fit_profile_table(pq.read_table(path), source=path.name)
        calibration.cost_model.save(args.fit_out)
        warn_if_poor(calibration.cost_model, f"written to {args.fit_out}")
        print(json.dumps(calibration.cost_model.fit_report, indent=1))
        print(f"wrote {args.fit_out}")
    print(f"profile written to {path}")
    return 0


def _operators(args: argparse.Namespace) -> int:
    if args.merge is not None:
        return _update(args, args.merge)
    import torch

    from simulator.operator_profile import profile_operators
    from simulator.operator_shapes import quick_grid

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    tables = tuple(name.strip() for name in args.tables.split(",")) if args.tables else None
    if args.update is not None and tables is None:
        raise ValueError("--update re-measures some tables of a profile: name them with --tables")
    timed = Path(args.out).with_name(Path(args.out).name + ".timed") if args.update else args.out
    path = profile_operators(timed, device=device, dtype=dtype, max_seconds=args.max_seconds or 420.0,
                             grid=quick_grid() if args.quick else None, tables=tables, base=args.update)
    if args.update is not None:
        _update(args, path)
        Path(path).unlink()
        return 0
    print(f"operator profile written to {path}")
    return 0


def _update(args: argparse.Namespace, timed) -> int:
    from simulator.operator_profile import update_operator_profile

    if args.update is None:
        raise ValueError("--merge names the tables to put into a profile: give that profile with --update")
    table = update_operator_profile(args.update, timed, args.out)
    replaced = json.loads(dict(table.schema.metadata)[b"remeasured"])
    print(f"operator profile {args.update} written to {args.out} ({table.num_rows} rows) with these tables from "
          f"{timed}: {', '.join(sorted(replaced))}")
    return 0
