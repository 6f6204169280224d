"""Time build_report on a synthetic 20,000-request run, alone and as a real-vs-simulated pair (target < 10 s)."""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from analysis.report import build_report
from analysis.run_store import Run, run_metadata
from analysis.synthetic_run import synthetic_run

TARGET_SECONDS = 10.0


def main() -> None:
    """Synthesize the run, build its reports, print the timings."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=20.0, help="arrival rate (req/s) of the synthetic trace")
    parser.add_argument("--out", type=Path, default=None, help="folder for the reports (default: a temporary one)")
    args = parser.parse_args()

    started = time.perf_counter()
    requests, steps = synthetic_run(args.requests, request_rate=args.rate, seed=0)
    tokens = int(requests.column("output_len").to_numpy().sum())
    print(f"synthesized {requests.num_rows} requests, {steps.num_rows} steps, {tokens} output tokens "
          f"in {time.perf_counter() - started:.2f} s")
    noisy = steps.column("duration").to_numpy() * np.random.default_rng(1).lognormal(0.0, 0.05, steps.num_rows)
    sim_steps = steps.set_column(steps.schema.get_field_index("duration"), "duration", pa.array(noisy))
    out = args.out or Path(tempfile.mkdtemp(prefix="twinfer-report-bench-"))
    real = Run(out / "real", requests, steps, run_metadata(executor_kind="gpu", trace_fingerprint="bench", name="real"))
    sim = Run(out / "sim", requests, sim_steps,
              run_metadata(executor_kind="sim", trace_fingerprint="bench", name="sim", calibrated=True))

    for label, runs in (("one run", [real]), ("real + simulated pair", [real, sim])):
        path = out / f"report-{len(runs)}.html"
        started = time.perf_counter()
        contents = build_report(runs, path)
        elapsed = time.perf_counter() - started
        verdict = "OK" if elapsed < TARGET_SECONDS else "OVER TARGET"
        print(f"build_report, {label}, {args.requests} requests: {elapsed:.2f} s "
              f"({contents.num_figures} plots, {path.stat().st_size / 1e6:.1f} MB) [{verdict}: < {TARGET_SECONDS:.0f} s]")
    print(f"reports in {out}")


if __name__ == "__main__":
    main()
