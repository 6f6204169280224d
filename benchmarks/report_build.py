"""Time build_report on a simulated 20,000-request run, alone and as a real-vs-simulated pair (target < 10 s).

The run is `twinfer simulate` of the bundled Azure conversation sample, repeated end to end up to
--requests requests and replayed at --rate (Qwen3-0.6B, the bundled H100 profile). The pair's "real" run is
a stand-in: the same run with 5% lognormal noise on every step duration, so its schedule is the simulated
one, as a calibrated simulation's would be.
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analysis.report import build_report
from analysis.run_store import Run, read_run, run_metadata
from traces.native import write_trace
from traces.schema import Trace
from traces.trace_options import load_trace
from twinfer.cli import main as twinfer

TARGET_SECONDS = 10.0


def repeated_trace(trace: Trace, num_requests: int) -> Trace:
    """The trace's requests over and over, each copy arriving one mean gap after the last, to num_requests."""
    table = trace.table
    period = trace.duration * len(trace) / (len(trace) - 1)
    copies = []
    for copy in range(-(-num_requests // len(trace))):
        shifted = table.set_column(table.schema.get_field_index("arrival_time"), "arrival_time",
                                   pc.add(table.column("arrival_time"), copy * period))
        copies.append(shifted.set_column(table.schema.get_field_index("request_id"), "request_id",
                                         pc.binary_join_element_wise(table.column("request_id"), f"-{copy}", "")))
    table = pa.concat_tables(copies).slice(0, num_requests)
    note = f"{trace.name} repeated to {num_requests} requests"
    return dataclasses.replace(trace, table=table, name=f"{trace.name}-x{len(copies)}", notes=[*trace.notes, note])


def main() -> None:
    """Simulate the run, build its reports, print the timings."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=20.0, help="arrival rate (req/s) the trace is replayed at")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs and reports (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="twinfer-report-bench-"))

    started = time.perf_counter()
    trace_path = write_trace(repeated_trace(load_trace("azure-conv"), args.requests), out / "trace.parquet")
    status = twinfer(["simulate", str(trace_path), "--model", "qwen3-0.6b", "--gpu", "h100", "--request-rate",
                      str(args.rate), "--out", str(out / "sim"), "--no-progress"])
    if status:
        raise SystemExit(status)
    sim = read_run(out / "sim")
    tokens = int(pc.sum(sim.requests.column("output_len")).as_py())
    print(f"simulated {sim.requests.num_rows} requests, {sim.steps.num_rows} steps, {tokens} output tokens "
          f"in {time.perf_counter() - started:.2f} s")
    steps = sim.steps
    noisy = steps.column("duration").to_numpy() * np.random.default_rng(1).lognormal(0.0, 0.05, steps.num_rows)
    real_steps = steps.set_column(steps.schema.get_field_index("duration"), "duration", pa.array(noisy))
    real = Run(out / "real", sim.requests, real_steps,
               run_metadata(executor_kind="gpu", trace_fingerprint=sim.trace_fingerprint, name="real stand-in",
                            trace_name=sim.metadata.get("trace_name"), model=sim.metadata.get("model"),
                            gpu=sim.metadata.get("gpu")))

    for label, runs in (("one run", [sim]), ("real + simulated pair", [real, sim])):
        path = out / f"report-{len(runs)}.html"
        started = time.perf_counter()
        contents = build_report(runs, path)
        elapsed = time.perf_counter() - started
        verdict = "OK" if elapsed < TARGET_SECONDS else "OVER TARGET"
        print(f"build_report, {label}, {sim.requests.num_rows} requests: {elapsed:.2f} s "
              f"({contents.num_figures} plots, {path.stat().st_size / 1e6:.1f} MB) [{verdict}: < {TARGET_SECONDS:.0f} s]")
    print(f"runs and reports in {out}")


if __name__ == "__main__":
    main()
