"""`twinfer profile`: time the real executor over a grid of batch shapes (on a GPU)."""

import argparse
import json


def register(commands) -> None:
    parser = commands.add_parser("profile", help="time the real executor over a grid of batch shapes (GPU)")
    parser.add_argument("--model", required=True, help="preset name or model folder (dummy weights are used)")
    parser.add_argument("--out", required=True, help="Parquet file to write")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-seconds", type=float, default=480, help="total time budget, setup included")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's, capped at 32768")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
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
    import pyarrow.parquet as pq

    from simulator.profile import profile

    path = profile(
        args.model,
        args.out,
        tp=args.tp,
        dtype=args.dtype,
        max_seconds=args.max_seconds,
        repeats=args.repeats,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        device=args.device,
        seed=args.seed,
        max_shapes=args.max_shapes,
        serving_seconds=args.serving_seconds,
        serving_rate=args.serving_rate,
        mixed_cuda_graphs=args.mixed_cuda_graphs,
    )
    if args.fit_out:
        from simulator.calibrate import fit_profile_table

        calibration = fit_profile_table(pq.read_table(path), source=path.name)
        calibration.cost_model.save(args.fit_out)
        print(json.dumps(calibration.cost_model.fit_report, indent=1))
        print(f"wrote {args.fit_out}")
    print(f"profile written to {path}")
    return 0
