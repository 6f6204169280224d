"""`twinfer calibrate`: fit a cost model from profiles and runs' steps."""

import argparse
import json
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser("calibrate", help="fit a cost model from profiles and/or runs' steps")
    parser.add_argument("inputs", nargs="+", help="profile Parquet files or run folders")
    parser.add_argument("--out", required=True, help="where to write the cost model JSON")
    parser.add_argument("--gpu", required=True, help="the GPU the profiles and runs were measured on, e.g. h100")
    parser.add_argument("--model", required=True, help="the model profiled (preset name or folder)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size measured")
    parser.add_argument("--dtype", default="bfloat16", help="dtype measured")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of steps held out to score the fit")


def run(args: argparse.Namespace) -> int:
    """Fit, save and print the fit report."""
    from simulator.calibrate import fit, read_steps
    from simulator.calibration_quality import warn_if_poor
    from simulator.gpu_specs import gpu_key

    columns, _ = read_steps(args.inputs)
    calibration = fit(
        columns,
        gpu=gpu_key(args.gpu),
        model=args.model,
        tp=args.tp,
        dtype=args.dtype,
        holdout_fraction=args.holdout,
        source=", ".join(Path(p).name for p in args.inputs),
    )
    calibration.cost_model.save(args.out)
    warn_if_poor(calibration.cost_model, f"written to {args.out}")
    print(json.dumps(calibration.cost_model.fit_report, indent=1))
    print(f"wrote {args.out} ({calibration.cost_model.label})")
    return 0
