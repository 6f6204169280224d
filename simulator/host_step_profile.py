"""The engine's host time per step, for the operator profile: the real engine serves a Poisson load on a probe model
(never one a profile is validated on), each step's host time is fitted as the cost model's host terms, and what
the probe's CUDA-graph steps took on the device beyond the profile's composition of them as graph_gap rows.

A graph step's host time is its duration less its device work (CUDA events from the step's upload to its
samples' copy). Its duration less the host's wait after the launch returned, the measure used before, counted
device work that ran while the launch was returning as host time: 10.9 us per decode sequence in session 11's
profile, where the held-out models' steps show about 4 (issue 15). An eager step's host time stays its duration
less that wait: its launches, which the device waits on, are the host's, and the composition replaces the probe's
launches with the model's own. Where the runner cannot time its device work (the CPU) the wait is the measure for
every step, and the metadata says which.
"""

import contextlib
import time

import numpy as np

from simulator.operator_shapes import OperatorGrid
from simulator.operator_timing import ProfileContext, TableRun, release_memory

HOST_TERMS = ("step", "decode_seq", "prefill_seq", "prefill_token", "mixed_step", "eager_step")


class _DeviceTimer:
    """An executor over a ModelExecutor that keeps, per step, the device's work (CUDA events, where the runner
    times it; else None) and how long the host waited for the device after launching the step."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.num_kv_blocks = executor.num_kv_blocks
        self.device_seconds: list[float | None] = []
        self.device_waits: list[float] = []

    def execute(self, scheduler_output):
        from engine.scheduler_output import StepResult

        start = time.perf_counter()
        pending = self.executor.execute_async(scheduler_output)
        launched = time.perf_counter()
        result = pending.result()
        end = time.perf_counter()
        self.device_waits.append(end - launched)
        self.device_seconds.append(pending.device_seconds)
        return StepResult(sampled_token_ids=result.sampled_token_ids, duration=end - start,
                          cuda_graph_batch_size=result.cuda_graph_batch_size)


def _probe_executor(context: ProfileContext, model: str):
    """(the real executor on the probe (dummy weights, CUDA graphs as the engine's defaults make them), its engine
    config, the probe's layers)."""
    import torch
    from engine.config import EngineConfig
    from engine.engine_args import EngineArgs
    from engine.model_config import load_model_config
    from engine.model_executor import ModelExecutor

    model_config = load_model_config(model)
    if context.grid.probe_engine:
        config = EngineConfig(vocab_size=model_config.vocab_size, **context.grid.probe_engine)
    else:
        memory_gib = torch.cuda.get_device_properties(context.device).total_memory / 2**30
        config = EngineArgs(model=model, async_scheduling=False).engine_config(model_config, gpu_memory_gib=memory_gib)
    # Less than the engine's 0.9 of the memory: whatever the executor leaves behind, the tables after it still fit.
    executor = ModelExecutor(model, config, dtype=context.dtype_name, device=str(context.device),
                             gpu_memory_utilization=0.6, load_format="dummy", seed=0)
    executor.runner.time_device_work = True
    return executor, config, model_config.num_hidden_layers


def host_step_table(run: TableRun, context: ProfileContext) -> None:
    """Serve a Poisson load on the probe with the real engine, fit HOST_TERMS to each step's host time, then the
    graph_gap rows: what the probe's graph steps took on the device beyond this profile's composition of them."""
    grid = context.grid
    if not run.open():
        return
    release_memory(context.device, collect=True)
    executor, config, layers = _probe_executor(context, grid.probe)
    try:
        steps = _serve_probe(run, executor, config, grid)
    finally:
        _release_executor(executor)
        del executor
        release_memory(context.device, collect=True)
    coefficients, report = fit_host_terms(steps)
    run.log(f"host_step: {len(steps)} serving steps, fit {report}")
    for term, seconds_per_unit in coefficients.items():
        run.add("host_step", seconds_per_unit, report["steps"], variant=term, graph=False, tp=1)
    if coefficients and report["measure"] != "device_wait":
        profile = context.profile_so_far(run.rows)
        gaps, gap_report = fit_graph_gaps(steps, profile, grid.probe, config.max_model_len)
        run.log(f"graph_gap: {gap_report}")
        for kind, (seconds_per_kernel, kernels) in gaps.items():
            run.add("graph_gap", seconds_per_kernel, gap_report[kind]["steps"], variant=kind, graph=True, m=kernels)
        report["graph_gap"] = gap_report
    context.host_report = dict(report, probe=grid.probe, probe_layers=layers)


MIN_HOST_STEPS = 40


def _serve_probe(run: TableRun, executor, config, grid: OperatorGrid) -> list[dict]:
    """Serving steps with their device waits, in rounds (each an eager-prompt half and a graph half when mixed-step
    graphs are on) until there are enough for the fit or the table's time is spent."""
    from simulator.profile import serving_steps

    halves = (True, False) if executor.mixed_cuda_graphs else (False,)
    steps: list[dict] = []
    while len(steps) < MIN_HOST_STEPS:
        seconds = min(grid.serving_seconds, run.seconds_left() - 5)
        if seconds < min(grid.serving_seconds, 6.0) / 2:
            run.log(f"host_step: {run.seconds_left():.0f} s left: serving stops at {len(steps)} steps")
            run.cut = True
            break
        for eager in halves:
            timer = _DeviceTimer(executor)
            with executor.eager_prompt_steps() if eager else contextlib.nullcontext():
                rows = serving_steps(timer, config, seconds=seconds / len(halves), rate=grid.serving_rate,
                                     seed=len(steps) + eager)
            # The first steps warm up; the last one's duration never reached the next step's start.
            steps += [dict(row, device_wait=wait, device_seconds=device)
                      for row, wait, device in zip(rows[3:-1], timer.device_waits[3:], timer.device_seconds[3:])]
    return steps


def _release_executor(executor) -> None:
    executor.runner.release_graphs()
    executor.shutdown()


def host_seconds(step: dict) -> float:
    """A serving step's host time: in a CUDA graph its duration less its device work where that was timed; an
    eager step's (and any untimed one's) duration less the host's wait after its launches returned, so that its
    launches, which the device waits on, count as the host's."""
    timed = step.get("device_seconds") is not None and step["cuda_graph_batch_size"] > 0
    return step["duration"] - (step["device_seconds"] if timed else step["device_wait"])


def fit_host_terms(steps: list[dict]) -> tuple[dict[str, float], dict]:
    """Host seconds per step (host_seconds) as HOST_TERMS' sum, each weight >= 0, fitted to relative error; terms
    no step exercises are left out. Also a report: steps used, median relative error, the measure
    ("graph_device_work" where graph steps had their device work timed, else "device_wait")."""
    from simulator.nonnegative_least_squares import nonnegative_least_squares

    timed = any(step.get("device_seconds") is not None and step["cuda_graph_batch_size"] > 0 for step in steps)
    host = np.array([host_seconds(step) for step in steps], dtype=np.float64)
    decode = np.array([step["num_decode_seqs"] for step in steps], dtype=np.float64)
    prefill = np.array([step["num_prefill_seqs"] for step in steps], dtype=np.float64)
    tokens = np.array([step["num_prefill_tokens"] for step in steps], dtype=np.float64)
    eager = np.array([step["cuda_graph_batch_size"] == 0 for step in steps], dtype=np.float64)
    mixed = ((decode > 0) & (prefill > 0)).astype(np.float64)
    design = np.column_stack([np.ones_like(host), decode, prefill, tokens, mixed, eager])
    # Pauses (the collector, the OS) are not the engine's cost per step: the slowest 2% are left out.
    keep = (host > 0) & (host <= np.percentile(host, 98)) if len(host) else host > 0
    used = [term for term, column in zip(HOST_TERMS, design[keep].T) if np.any(column > 0)]
    if keep.sum() < len(used) + 2:
        return {}, {"steps": int(keep.sum()), "error": "too few serving steps to fit"}
    columns = [HOST_TERMS.index(term) for term in used]
    matrix = design[keep][:, columns] / host[keep, None]
    solution = nonnegative_least_squares(matrix, np.ones(int(keep.sum())))
    relative = matrix @ solution - 1.0
    report = {"steps": int(keep.sum()), "median_relative_error": round(float(np.median(np.abs(relative))), 4),
              "unmeasured": [term for term in HOST_TERMS if term not in used],
              "measure": "graph_device_work" if timed else "device_wait"}
    return dict(zip(used, (float(value) for value in solution))), report


def fit_graph_gaps(steps: list[dict], profile, probe: str, max_model_len: int) -> tuple[dict, dict]:
    """Per kind of CUDA graph ("decode", "mixed"): (seconds per kernel, the probe's kernels in such a graph), the
    median over the probe's timed graph steps of their device work less the composition's device part (every
    term but the host's) of the same batch, per kernel, at least 0; and a report. The composition is this
    profile's with no graph_gap rows, at the probe's shape and engine width."""
    from engine.stats import BatchFeatures
    from simulator.composed import ComposedCostModel
    from simulator.model_operators import kernel_counts
    from simulator.model_shape import ModelShape

    shape = ModelShape.load(probe)
    model = ComposedCostModel(shape, profile.without("graph_gap"), max_model_len=max_model_len)
    gaps, report = {}, {}
    for kind, head in (("decode", True), ("mixed", False)):
        residuals = []
        for step in steps:
            if step.get("device_seconds") is None or not step["cuda_graph_batch_size"]:
                continue
            if (step["num_prefill_seqs"] == 0) != (kind == "decode"):
                continue
            features = BatchFeatures(*(step[name] for name in BatchFeatures._fields))
            parts = model.step_breakdown(features, step["cuda_graph_batch_size"])
            residuals.append(step["device_seconds"] - (sum(parts.values()) - parts["host"]))
        kernels = kernel_counts(shape.num_layers, False, kind, head, row_gather=False)["all"]
        if len(residuals) < MIN_HOST_STEPS:
            report[kind] = {"steps": len(residuals), "error": "too few timed graph steps to fit"}
            continue
        median = float(np.median(residuals))
        gaps[kind] = (max(0.0, median) / kernels, kernels)
        report[kind] = {"steps": len(residuals), "median_residual_s": round(median, 7), "kernels": kernels,
                        "seconds_per_kernel": round(gaps[kind][0], 10)}
    return gaps, report
