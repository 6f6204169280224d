"""The engine's host time per step, for the operator profile: the real engine serves a Poisson load on a probe model
(never one a profile is validated on), each step's duration less its wait for the device is the host's, and the
cost model's host terms are fitted to it."""

import contextlib
import time

import numpy as np

from simulator.operator_shapes import OperatorGrid
from simulator.operator_timing import ProfileContext, TableRun, release_memory

HOST_TERMS = ("step", "decode_seq", "prefill_seq", "prefill_token", "mixed_step", "eager_step")


class _DeviceWaitTimer:
    """An executor over a ModelExecutor that keeps, per step, how long the host waited for the device after
    launching the step's work: the step's duration less that wait is the host's time (an eager step's launches
    included, since they overlap the device's work)."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.num_kv_blocks = executor.num_kv_blocks
        self.device_waits: list[float] = []

    def execute(self, scheduler_output):
        from engine.scheduler_output import StepResult

        start = time.perf_counter()
        pending = self.executor.execute_async(scheduler_output)
        launched = time.perf_counter()
        result = pending.result()
        end = time.perf_counter()
        self.device_waits.append(end - launched)
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
    return executor, config, model_config.num_hidden_layers


def host_step_table(run: TableRun, context: ProfileContext) -> None:
    """Serve a Poisson load on the probe with the real engine, take each step's duration less its wait for the
    device, and fit HOST_TERMS to it."""
    grid = context.grid
    if not run.open():
        return
    release_memory(context.device, collect=True)
    executor, config, layers = _probe_executor(context, grid.probe)
    try:
        steps = _serve_probe(run, executor, config, grid)
        coefficients, report = fit_host_terms(steps)
        run.log(f"host_step: {len(steps)} serving steps, fit {report}")
        for term, seconds_per_unit in coefficients.items():
            run.add("host_step", seconds_per_unit, report["steps"], variant=term, graph=False, tp=1)
        context.host_report = dict(report, probe=grid.probe, probe_layers=layers)
    finally:
        _release_executor(executor)
        del executor
        release_memory(context.device, collect=True)


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
            timer = _DeviceWaitTimer(executor)
            with executor.eager_prompt_steps() if eager else contextlib.nullcontext():
                rows = serving_steps(timer, config, seconds=seconds / len(halves), rate=grid.serving_rate,
                                     seed=len(steps) + eager)
            # The first steps warm up; the last one's duration never reached the next step's start.
            steps += [dict(row, device_wait=wait) for row, wait in zip(rows[3:-1], timer.device_waits[3:])]
    return steps


def _release_executor(executor) -> None:
    executor.runner.release_graphs()
    executor.shutdown()


def fit_host_terms(steps: list[dict]) -> tuple[dict[str, float], dict]:
    """Host seconds per step (duration less the device wait) as HOST_TERMS' sum, each weight >= 0, fitted to
    relative error; terms no step exercises are left out. Also a report: steps used, median relative error."""
    from simulator.nonnegative_least_squares import nonnegative_least_squares

    host = np.array([step["duration"] - step["device_wait"] for step in steps], dtype=np.float64)
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
              "unmeasured": [term for term in HOST_TERMS if term not in used]}
    return dict(zip(used, (float(value) for value in solution))), report
