"""The host-step probe's serving steps, each with its duration, its device work (CUDA events) and the host's wait
after the launch, written to Parquet (issue 15): what the operator profile fits its host terms on, kept for a
look at how the composition's GPU part sits against the device's own time on a model no profile validates.

    python3 benchmarks/probe_steps.py [--probe qwen3-1.7b] [--seconds 30] --out probe_steps.parquet
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", default="qwen3-1.7b")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import pandas as pd
    import torch

    from simulator.host_step_profile import _probe_executor, _release_executor, _serve_probe
    from simulator.operator_profile import profile_context
    from simulator.operator_shapes import FULL_GRID
    from simulator.operator_timing import TableRun

    grid = dataclasses.replace(FULL_GRID, probe=args.probe, serving_seconds=args.seconds)
    with torch.inference_mode():
        context = profile_context(torch.device("cuda"), torch.bfloat16, grid)
        run = TableRun("probe_steps", time.perf_counter() + args.seconds * 3 + 60, context, print)
        executor, config, layers = _probe_executor(context, args.probe)
        try:
            steps = _serve_probe(run, executor, config, grid)
        finally:
            _release_executor(executor)
    frame = pd.DataFrame(steps)
    frame["probe"], frame["max_model_len"] = args.probe, config.max_model_len
    frame.to_parquet(args.out)
    print(f"{len(frame)} steps of {args.probe} ({layers} layers) to {args.out}; columns {list(frame.columns)}")


if __name__ == "__main__":
    main()
