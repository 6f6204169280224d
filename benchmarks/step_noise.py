"""How much of a real run's decode-step time no batch-based cost model can predict (its noise floor).

Each run's decode steps (no prompt chunk; a profile's serving phase only) are fitted by themselves, one least-squares
line in (sequences, context tokens) per CUDA-graph size (sizes with at least 50 steps). What is left is printed as
a MAPE, with the spread of its medians over 2.5 s blocks (a drift that lasts seconds shows there) and a histogram.
The fit is in-sample with three terms per graph size, so the floor it gives is, if anything, low.

    python benchmarks/step_noise.py RUN_DIR_OR_PROFILE.parquet ...
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from analysis.run_store import read_run

BLOCK_SECONDS = 2.5
MIN_STEPS = 50


def decode_residuals(steps) -> tuple[np.ndarray, np.ndarray]:
    """Relative residual of each decode step against its graph size's own fit, and the step's start time."""
    residuals, starts = [], []
    for _, group in steps.groupby("cuda_graph_batch_size"):
        if len(group) < MIN_STEPS:
            continue
        design = np.column_stack([np.ones(len(group)), group.num_decode_seqs, group.decode_context_tokens])
        duration = group.duration.to_numpy()
        coefficients, *_ = np.linalg.lstsq(design, duration, rcond=None)
        residuals.append((duration - design @ coefficients) / duration)
        starts.append(group.start_time.to_numpy())
    if not residuals:
        return np.array([]), np.array([])
    return np.concatenate(residuals), np.concatenate(starts)


def read_decode_steps(path: Path):
    """The CUDA-graph decode steps of a run folder, or of a profile's serving phase."""
    steps = (read_run(path).steps if path.is_dir() else pq.read_table(path)).to_pandas()
    if "grid" in steps.columns:  # a profile: only its serving phase is a run of the engine
        steps = steps[steps.grid == "serving"]
    return steps[(steps.duration > 0) & (steps.num_prefill_seqs == 0) & (steps.cuda_graph_batch_size > 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (steps.parquet inside) or profile Parquet files")
    args = parser.parse_args()
    edges = np.arange(-0.15, 0.151, 0.03)
    print(f"{'run':48} {'steps':>6} {'median ms':>9} {'MAPE':>6} {'block sd':>8}  residuals in 3% bins from -15% to +15%")
    for name in args.runs:
        path = Path(name)
        steps = read_decode_steps(path)
        residuals, starts = decode_residuals(steps)
        if not len(residuals):
            print(f"{path.name:48} no graph size with {MIN_STEPS} decode steps")
            continue
        blocks = (starts - starts.min()) // BLOCK_SECONDS
        medians = [np.median(residuals[blocks == block]) for block in np.unique(blocks)]
        histogram = np.histogram(np.clip(residuals, edges[0], edges[-1]), bins=edges)[0]
        print(f"{path.name:48} {len(residuals):6d} {1e3 * steps.duration.median():9.2f} "
              f"{100 * np.mean(np.abs(residuals)):5.2f}% {100 * np.std(medians):7.2f}%  {' '.join(map(str, histogram))}")


if __name__ == "__main__":
    main()
