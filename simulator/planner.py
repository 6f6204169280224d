"""Capacity planning: which GPU, TP degree and batch limit serve a trace at a target rate within SLOs, cheapest.

For each configuration (gpu x tp x max_num_seqs):
1. Search the highest request rate ONE replica sustains: the trace's arrivals are rescaled to a rate
   (traces.transforms.with_request_rate's rule) and simulated; "sustains" means every SLO percentile is met
   and no request is rejected. The rate is bracketed by doubling or halving from the target rate,
   then bisected geometrically (`search_steps` times: 6 steps pin it within about 1%).
2. Replicas = ceil(target / max rate), verified by simulating the cluster at the target rate behind the
   router, adding replicas until the SLOs hold (so load imbalance counts).
3. GPUs = replicas x tp; hourly cost = GPUs x price per GPU-hour.

Speed: a probe that has already broken an SLO stops early (SloMonitor: once more requests exceed a limit
than the percentile allows, no later request can repair it). The search runs on a window: the trace's
busiest `search_requests` consecutive requests (default 1000), time-scaled exactly as the whole trace is
for a given mean rate, so a rate means the same thing for both and the window holds the trace's hardest
burst. (On the Azure conversation trace, whose busiest 1,000 requests arrive 1.46x faster than its mean,
the window's max rate came within -13%..+3% of a whole-trace search for qwen3-8b on one H100, where the
first 1,000 requests were 11-32% optimistic.) The `verify_top` cheapest configurations (default 3) are
then verified on the whole trace at the target rate, adding replicas where the window was optimistic or
removing them where it was pessimistic, and the table is ranked again; so is any configuration that one
replica fewer would make as cheap as the best, when its window rate is within WINDOW_MARGIN of that. Configurations run in parallel
processes (or as Ray tasks with `--ray`). Configurations that differ only in max_num_seqs share a simulation where
neither that limit nor the KV cache decided anything in it (simulator/probe_memo.py), and where no two prompts can
meet in the prefix cache a probe runs without it (the same run, cheaper) unless something was preempted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm import tqdm

from engine.engine_args import EngineArgs
from simulator.cluster import ClusterRun
from simulator.gpu_prices import DEFAULT_PRICES, price_of
from simulator.plan_table import PlanResult, probes_table, rank_plans
from simulator.probe_memo import ProbeMemo, requests_key
from simulator.router import DEFAULT_ROUTER, ROUTERS, make_router
from simulator.slo import Slo, SloMonitor, slo_values
from simulator.trace_requests import TraceRequests
from traces.schema import Trace

DEFAULT_SEARCH_REQUESTS = 1000
DEFAULT_SEARCH_STEPS = 6
DEFAULT_VERIFY_TOP = 3
_MAX_BRACKET_PROBES = 12


# ---- inputs


@dataclass(frozen=True)
class PlanConfig:
    """One candidate deployment of a replica: GPU type, tensor-parallel degree, max_num_seqs."""

    gpu: str
    tp: int
    max_num_seqs: int

    @property
    def label(self) -> str:
        """'h100 tp2 seqs128'."""
        return f"{self.gpu} tp{self.tp} seqs{self.max_num_seqs}"


@dataclass(frozen=True)
class PlanSettings:
    """What every configuration is judged by, and how hard the search works."""

    model: str
    slos: tuple[Slo, ...]
    target_rate: float
    router: str = DEFAULT_ROUTER
    dtype: str = "bfloat16"
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    search_steps: int = DEFAULT_SEARCH_STEPS
    max_replicas: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_rate) and self.target_rate > 0):
            raise ValueError(f"--target-rate must be a positive number of requests/s, got {self.target_rate}")
        if self.router not in ROUTERS:
            raise ValueError(f"--router {self.router!r} unknown: expected one of {', '.join(ROUTERS)}")
        if not self.slos:
            raise ValueError("a plan needs at least one SLO")
        if self.search_steps < 0 or self.max_replicas < 1:
            raise ValueError(f"need search_steps >= 0 and max_replicas >= 1, got {self.search_steps}, {self.max_replicas}")


# ---- one configuration


@dataclass(frozen=True)
class Probe:
    """One simulation of the search: a rate, a replica count, whether the SLOs held and the latencies."""

    phase: str
    """search (one replica), verify (cluster on the window) or full (cluster on the whole trace)."""
    rate: float
    replicas: int
    num_requests: int
    sustained: bool
    reason: str
    """Why it did not sustain ('' when it did)."""
    stopped_early: bool
    values_ms: dict[str, float]
    """SLO percentiles and p99 TTFT/TPOT/E2EL (lower bounds when stopped early)."""
    seconds: float
    """CPU wall time of the simulation."""


@dataclass(frozen=True)
class ConfigPlan:
    """What planning found for one configuration."""

    config: PlanConfig
    status: str
    """ok, infeasible (no rate sustained, or SLO not reached with max_replicas), or error."""
    calibrated: bool = False
    provenance: str = "roofline"
    """Which kind of cost model predicted it: calibrated, composed or roofline."""
    calibration_quality: str = ""
    """'poorly calibrated: why' when a calibrated profile failed its quality gates; '' otherwise."""
    cost_model: str = ""
    num_kv_blocks: int = 0
    max_rate: float = 0.0
    """Highest request rate one replica sustains (requests/s), from the window."""
    max_rate_is_lower_bound: bool = False
    """The search sustained every rate it tried: the replica takes at least max_rate, how much more is unknown."""
    replicas: int = 0
    verified_on: str = ""
    note: str = ""
    probes: tuple[Probe, ...] = ()

    @property
    def gpus(self) -> int:
        """GPUs the plan needs: replicas x tp."""
        return self.replicas * self.config.tp


def engine_args_of(config: PlanConfig, settings: PlanSettings) -> EngineArgs:
    """The EngineArgs of one replica of this configuration (synchronous scheduling, as `twinfer simulate`'s
    default)."""
    return EngineArgs(
        model=settings.model,
        dtype=settings.dtype,
        seed=settings.seed,
        block_size=settings.block_size,
        max_model_len=settings.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enable_prefix_caching=settings.enable_prefix_caching,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=config.tp,
        async_scheduling=False,
    )


class ReplicaBuilder:
    """Builds quiet simulated replicas of one configuration, all sharing the first one's cost model (built once,
    not once per replica and probe)."""

    def __init__(self, config: PlanConfig, settings: PlanSettings) -> None:
        self.config = config
        self.args = engine_args_of(config, settings)
        engine, metadata = self._build(self.args, None)
        self.metadata = {**metadata, "num_kv_blocks": engine.block_manager.num_blocks}
        self.cost_model = engine.executor.cost_model
        self.token_id = engine.executor.token_id
        """The token every simulated sample is."""
        self.preempts = False
        """Whether a probe of this configuration preempted (its next probes then keep the prefix cache)."""

    def __call__(self):
        """One replica."""
        return self._build(self.args, self.cost_model)[0]

    def without_prefix_caching(self):
        """One replica with prefix caching off (the same run as with it, where no prompt can hit the cache)."""
        return self._build(dataclasses.replace(self.args, enable_prefix_caching=False), self.cost_model)[0]

    def _build(self, args: EngineArgs, cost_model):
        from simulator.simulated_engine import build_simulated_engine

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_simulated_engine(args, gpu=self.config.gpu, cost_model=cost_model)


def replica_builder(config: PlanConfig, settings: PlanSettings) -> tuple[ReplicaBuilder, dict]:
    """The configuration's ReplicaBuilder (called, it builds one quiet simulated replica), and a replica's metadata."""
    builder = ReplicaBuilder(config, settings)
    return builder, builder.metadata


def run_probe(build, settings: PlanSettings, requests: TraceRequests, rate: float, replicas: int,
              phase: str) -> Probe:
    """Simulate `replicas` replicas at `rate` and judge the SLOs (stopping early once one is broken)."""
    return simulate_probe(build, settings, requests, rate, replicas, phase)[0]


def simulate_probe(build, settings: PlanSettings, requests: TraceRequests, rate: float, replicas: int,
                   phase: str) -> tuple[Probe, list]:
    """run_probe's probe, and the replicas' engines after the run."""
    start = time.perf_counter()
    scaled = requests.at_rate(rate)
    engines = [build() for _ in range(replicas)]
    monitor = SloMonitor(settings.slos, scaled)
    # The drain is checked about every TTFT budget, so a runaway queue is caught within one budget.
    interval = max(0.25, min(slo.limit_ms for slo in settings.slos) / 1000)
    # Looked at every tenth of the violators an SLO allows (at least every 10 arrivals, at most 100 times), so
    # a broken SLO stops the run soon after it is decided: every 19 arrivals of a 19,366-request trace at p99,
    # every 10 of a 1,000-request window.
    check_every = len(scaled) // 100
    if math.isfinite(monitor.fewest_violators):
        check_every = min(check_every, max(10, int(monitor.fewest_violators) // 10))
    result = ClusterRun(scaled, engines, make_router(settings.router, settings.block_size)).run(
        stop_check=monitor, check_every=max(1, check_every), drain_interval=interval)
    now = max(engine.clock.now() for engine in engines)
    values = slo_values(settings.slos, engines, now)
    # The monitor runs every few arrivals and while draining: a request rejected after its last look (one
    # of the final arrivals, the others already done) would otherwise pass unseen.
    reason = result.stopped or monitor(now, engines) or ""
    if not reason:
        broken = [f"{slo.name} {values[slo.name]:.0f} > {slo.limit_ms:g} ms"
                  for slo in settings.slos if values[slo.name] > slo.limit_ms]
        reason = "; ".join(broken)
    probe = Probe(phase, float(rate), replicas, len(scaled), not reason, reason, result.stopped is not None,
                  values, time.perf_counter() - start)
    return probe, engines


def memo_probe(memo: ProbeMemo | None, build, config: PlanConfig, num_kv_blocks: int, settings: PlanSettings,
               requests: TraceRequests, rate: float, replicas: int, phase: str) -> Probe:
    """run_probe, or the same simulation already run for another max_num_seqs (its seconds then 0)."""
    if memo is None:
        return run_probe(build, settings, requests, rate, replicas, phase)
    key = (config.gpu, config.tp, settings, requests_key(requests), float(rate), replicas)
    earlier = memo.find(key, config.max_num_seqs, num_kv_blocks)
    if earlier is not None:
        return dataclasses.replace(earlier, phase=phase, seconds=0.0)
    probe, engines = None, []
    if settings.enable_prefix_caching and isinstance(build, ReplicaBuilder) and not build.preempts and \
            not memo.prompts_can_meet(requests, settings.block_size, build.token_id):
        # No prompt can hit the cache: the run without one is the same run, without its bookkeeping (a fifth of
        # a whole-trace check), unless a preemption let a request meet its own blocks again.
        probe, engines = simulate_probe(build.without_prefix_caching, settings, requests, rate, replicas, phase)
        if any(engine.scheduler.num_preemptions for engine in engines):
            build.preempts = True  # a second run each time would cost more than the cache's bookkeeping saves
            seconds = probe.seconds
            probe, engines = simulate_probe(build, settings, requests, rate, replicas, phase)
            probe = dataclasses.replace(probe, seconds=probe.seconds + seconds)
    if probe is None:
        probe, engines = simulate_probe(build, settings, requests, rate, replicas, phase)
    memo.add(key, probe, engines, requests, config.max_num_seqs)
    return probe


def search_config(config: PlanConfig, settings: PlanSettings, window: TraceRequests,
                  memo: ProbeMemo | None = None) -> ConfigPlan:
    """Highest sustained rate of one replica on the window, then the replicas the target rate needs."""
    try:
        build, metadata = replica_builder(config, settings)
    except (ValueError, KeyError) as error:
        return ConfigPlan(config, "error", note=str(error))
    quality = metadata.get("calibration_quality") or {}
    poor = "poorly calibrated: " + "; ".join(quality["reasons"]) if quality.get("poorly_calibrated") else ""
    base = dict(calibrated=bool(metadata.get("calibrated")), provenance=str(metadata.get("provenance", "roofline")),
                calibration_quality=poor,
                cost_model=str(metadata.get("profile", "")),
                num_kv_blocks=int(metadata["num_kv_blocks"]))
    probes: list[Probe] = []

    done: dict[tuple[float, int], Probe] = {}

    def probe(rate: float, replicas: int = 1, phase: str = "search") -> Probe:
        # The verify step at one replica often repeats the first search probe (both at the target rate).
        earlier = done.get((rate, replicas))
        if earlier is not None:
            result = dataclasses.replace(earlier, phase=phase, seconds=0.0)
        else:
            result = done[(rate, replicas)] = memo_probe(memo, build, config, base["num_kv_blocks"], settings,
                                                         window, rate, replicas, phase)
        probes.append(result)
        return result

    # Starting at the target rate brackets in one or two probes for the configurations that matter.
    low, high = _bracket(probe, settings.target_rate)
    if low is None:
        last = probes[-1]
        return ConfigPlan(config, "infeasible", **base,
                          note=f"no rate sustained (down to {last.rate:.3g} req/s): {last.reason}",
                          probes=tuple(probes))
    for _ in range(settings.search_steps if high is not None else 0):
        middle = math.sqrt(low * high)
        if probe(middle).sustained:
            low = middle
        else:
            high = middle
    max_rate = low
    replicas = max(1, math.ceil(settings.target_rate / max_rate - 1e-9))
    replicas, note = _verify(lambda n: probe(settings.target_rate, n, "verify"), replicas, settings.max_replicas)
    status = "ok" if not note else "infeasible"
    return ConfigPlan(config, status, **base, max_rate=max_rate, max_rate_is_lower_bound=high is None,
                      replicas=replicas, verified_on=f"busiest {len(window)} requests", note=note,
                      probes=tuple(probes))


def _bracket(probe: Callable[[float], Probe], start: float) -> tuple[float | None, float | None]:
    """(sustained rate, broken rate) a factor 2 apart, by doubling or halving from start."""
    rate = start
    first = probe(rate)
    if "rejected" in first.reason:
        return None, rate  # rejections do not depend on the rate
    if first.sustained:
        for _ in range(_MAX_BRACKET_PROBES):
            if not probe(rate * 2).sustained:
                return rate, rate * 2
            rate *= 2
        return rate, None
    previous, flat = first, 0
    for _ in range(_MAX_BRACKET_PROBES):
        rate /= 2
        current = probe(rate)
        if current.sustained:
            return rate, rate * 2
        # Latencies that stop falling with the rate are those of an idle replica: no rate will do. Three
        # halvings in a row, since probes stopped early give only lower bounds.
        flat = flat + 1 if all(current.values_ms[k] >= 0.99 * v for k, v in previous.values_ms.items()) else 0
        if flat == 3:
            return None, rate
        previous = current
    return None, rate


def _verify(probe: Callable[[int], Probe], replicas: int, max_replicas: int) -> tuple[int, str]:
    """The fewest replicas from `replicas` up that sustain the target rate (note says if none does)."""
    replicas = min(replicas, max_replicas)
    while True:
        result = probe(replicas)
        if result.sustained:
            return replicas, ""
        if replicas >= max_replicas:
            return replicas, f"SLO not met at the target rate with {replicas} replicas: {result.reason}"
        replicas += 1


def verify_config(plan: ConfigPlan, settings: PlanSettings, full: TraceRequests,
                  memo: ProbeMemo | None = None) -> ConfigPlan:
    """Check the replica count on the whole trace at the target rate, adding replicas until the SLOs hold."""
    build, metadata = replica_builder(plan.config, settings)
    probes = list(plan.probes)

    def probe(replicas: int) -> Probe:
        result = memo_probe(memo, build, plan.config, int(metadata["num_kv_blocks"]), settings, full,
                            settings.target_rate, replicas, "full")
        probes.append(result)
        return result

    start = min(plan.replicas, settings.max_replicas)
    replicas, note = _verify(probe, start, settings.max_replicas)
    # The window may also have been pessimistic (its burst is harder than the whole trace): try fewer,
    # unless replicas had to be added (one fewer has just failed).
    added = replicas > start
    while not note and not added and replicas > 1 and probe(replicas - 1).sustained:
        replicas -= 1
    return dataclasses.replace(
        plan, replicas=replicas, status="ok" if not note else "infeasible", note=note,
        verified_on=f"all {len(full)} requests", probes=tuple(probes),
    )


# ---- running configurations in parallel (processes or Ray)


@dataclass(frozen=True)
class PlanTask:
    """One unit of parallel work: search a configuration, or verify a plan on the whole trace."""

    kind: str
    settings: PlanSettings
    search_requests: int
    config: PlanConfig | None = None
    plan: ConfigPlan | None = None


_REQUESTS_CACHE: dict[tuple[str, int, int], TraceRequests] = {}
"""Token ids per (trace fingerprint, vocabulary, seed), made once per worker process."""
_WORKER_TRACE: list[Trace] = []
_WORKER_MEMO: list[ProbeMemo | None] = [None]
"""The worker process's view of the plan's shared simulations (None: each task on its own)."""


def _requests_for(trace: Trace, settings: PlanSettings, count: int | None) -> TraceRequests:
    """The trace's busiest `count` consecutive requests (all when None) with their token ids (made once
    per process), scaled as the whole trace would be."""
    from engine.config import default_max_model_len
    from engine.model_config import load_model_config

    from analysis.run_store import trace_fingerprint

    model_config = load_model_config(settings.model)
    vocab_size = model_config.vocab_size
    # Longer prompts are rejected by every configuration: no token ids are made for them.
    max_model_len = settings.max_model_len or default_max_model_len(model_config.max_position_embeddings)
    key = (trace_fingerprint(trace.table), vocab_size, settings.seed)
    full = _REQUESTS_CACHE.get(key)
    if full is None:
        full = _REQUESTS_CACHE[key] = TraceRequests.from_trace(trace, vocab_size=vocab_size, seed=settings.seed,
                                                               max_prompt_len=max_model_len)
    return full if count is None or count >= len(full) else full.busiest_window(count)


def run_plan_task(task: PlanTask, trace: Trace | None = None, memo: ProbeMemo | None = None) -> ConfigPlan:
    """Do one task (the same function runs in a process pool and as a Ray task)."""
    if trace is None:
        trace, memo = _WORKER_TRACE[0], _WORKER_MEMO[0]
    memo = memo if memo is not None else ProbeMemo()  # a Ray task shares nothing, but its own probes
    if task.kind == "search":
        window = _requests_for(trace, task.settings, task.search_requests)
        return search_config(task.config, task.settings, window, memo)
    if task.kind == "verify":
        return verify_config(task.plan, task.settings, _requests_for(trace, task.settings, None), memo)
    raise ValueError(f"unknown plan task kind {task.kind!r}")


def _init_worker(trace: Trace, memo_store) -> None:
    _WORKER_TRACE[:] = [trace]
    _WORKER_MEMO[0] = None if memo_store is None else ProbeMemo(memo_store)
    warnings.simplefilter("ignore")


def _uses_processes(num_tasks: int, workers: int | None, ray_address: str | None) -> bool:
    return ray_address is None and (workers or os.cpu_count() or 1) > 1 and num_tasks > 1


def run_tasks(tasks: list[PlanTask], trace: Trace, *, workers: int | None, ray_address: str | None,
              description: str, show_progress: bool = True, memo_store=None) -> list[ConfigPlan]:
    """Run tasks across CPU cores (or on Ray), with a progress bar; results in task order. memo_store: where
    the tasks share their simulations (a dict, or a manager's dict for worker processes; Ray tasks share none)."""
    results: list[ConfigPlan | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc=description, unit="config", disable=not show_progress, dynamic_ncols=True)
    with bar:
        if ray_address is not None:
            for index, plan in _run_on_ray(tasks, trace, ray_address):
                results[index] = plan
                bar.update()
        elif not _uses_processes(len(tasks), workers, ray_address):
            memo = ProbeMemo(memo_store) if memo_store is not None else None
            for index, task in enumerate(tasks):
                results[index] = run_plan_task(task, trace, memo)
                bar.update()
        else:
            # Made here once, the trace's token ids reach forked workers with their memory instead of being made
            # again by each worker in each phase (other start methods make them in the worker, as before).
            for settings in {task.settings for task in tasks}:
                _requests_for(trace, settings, None)
            with ProcessPoolExecutor(max_workers=min(workers or os.cpu_count() or 1, len(tasks)),
                                     initializer=_init_worker, initargs=(trace, memo_store)) as pool:
                futures = {pool.submit(run_plan_task, task): index for index, task in enumerate(tasks)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    return results


def _run_on_ray(tasks: list[PlanTask], trace: Trace, address: str) -> Iterable[tuple[int, ConfigPlan]]:
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs the ray package: pip install 'ray[default]' (or run without --ray)") from None
    if not ray.is_initialized():
        ray.init(address=None if address in ("", "local") else address, ignore_reinit_error=True,
                 log_to_driver=False)
    remote = ray.remote(run_plan_task)
    trace_ref = ray.put(trace)
    pending = {remote.remote(task, trace_ref): index for index, task in enumerate(tasks)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            yield pending.pop(ref), ray.get(ref)


# ---- the plan


def plan(
    trace: Trace,
    configs: Sequence[PlanConfig],
    settings: PlanSettings,
    *,
    prices: dict[str, float] | None = None,
    search_requests: int | None = DEFAULT_SEARCH_REQUESTS,
    verify_top: int = DEFAULT_VERIFY_TOP,
    workers: int | None = None,
    ray_address: str | None = None,
    show_progress: bool = True,
    mix_roofline: bool = False,
) -> PlanResult:
    """Search every configuration (in parallel), verify the cheapest on the whole trace, rank them (roofline rows
    after the others unless mix_roofline)."""
    if len(trace) < 2:
        raise ValueError(f"trace {trace.name!r} has {len(trace)} request(s): planning needs at least 2")
    if not configs:
        raise ValueError("no configurations to plan")
    prices = dict(DEFAULT_PRICES if prices is None else prices)
    missing = sorted({config.gpu for config in configs if price_of(prices, config.gpu) is None})
    if missing:
        raise ValueError(f"no price for GPU(s) {', '.join(missing)}: give --price {missing[0]}=DOLLARS_PER_GPU_HOUR "
                         f"(defaults exist for {', '.join(DEFAULT_PRICES)})")
    window = len(trace) if search_requests is None else max(2, min(search_requests, len(trace)))
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # Configurations differing only in max_num_seqs often run the very same simulation (ProbeMemo says
        # when): worker processes share theirs through a manager's dict.
        if _uses_processes(len(configs), workers, ray_address):
            memo_store = stack.enter_context(multiprocessing.Manager()).dict()
        else:
            memo_store = {} if ray_address is None else None
        run = dict(workers=workers, ray_address=ray_address, show_progress=show_progress, memo_store=memo_store)
        # Smaller max_num_seqs first: the configurations of one GPU and TP then run one after another rather
        # than side by side, so a larger one finds the simulations a smaller one shares (results in input order).
        order = sorted(range(len(configs)), key=lambda i: configs[i].max_num_seqs)
        tasks = [PlanTask("search", settings, window, config=configs[i]) for i in order]
        plans = [None] * len(configs)
        for i, searched in zip(order, run_tasks(tasks, trace, description="plan: search", **run)):
            plans[i] = searched
        search_seconds = time.perf_counter() - start

        if verify_top > 0 and window < len(trace):
            top = _to_verify(rank_plans(plans, settings, prices, mix_roofline).to_pylist(), verify_top,
                             settings.target_rate)
            index = {(p.config.gpu, p.config.tp, p.config.max_num_seqs): i for i, p in enumerate(plans)}
            # The most replicas first (the longest checks start first); configurations starting from the same
            # count then follow one another, the later ones finding the earlier one's simulations to share.
            top.sort(key=lambda key: -plans[index[key]].replicas)
            verify = [PlanTask("verify", settings, window, plan=plans[index[key]]) for key in top]
            for key, verified in zip(top, run_tasks(verify, trace, description="plan: verify on the whole trace",
                                                    **run)):
                plans[index[key]] = verified
    info = {
        "trace": trace.name,
        "trace_requests": len(trace),
        "search_requests": window,
        "verify_top": verify_top,
        "model": settings.model,
        "slos": [dataclasses.asdict(slo) | {"name": slo.name} for slo in settings.slos],
        "target_rate": settings.target_rate,
        "router": settings.router,
        "prices_per_gpu_hour": prices,
        "search_steps": settings.search_steps,
        "search_seconds": search_seconds,
        "total_seconds": time.perf_counter() - start,
        "num_simulations": sum(len(p.probes) for p in plans),
    }
    return PlanResult(rank_plans(plans, settings, prices, mix_roofline), probes_table(plans, settings), info)


WINDOW_MARGIN = 0.2
"""How far the window's max rate may be off the whole trace's (seen: -13%..+3% on Azure conversation)."""


def _to_verify(rows: list[dict], verify_top: int, target_rate: float) -> list[tuple[str, int, int]]:
    """The cheapest `verify_top` feasible configurations, plus any that one replica fewer would make as
    cheap as the best, when its window rate is within WINDOW_MARGIN of what that needs."""
    feasible = [row for row in rows if row["rank"] is not None]
    chosen = feasible[:verify_top]
    if feasible:
        best = feasible[0]["hourly_cost"]
        for row in feasible[verify_top:]:
            fewer = row["replicas"] - 1
            if fewer >= 1 and fewer * row["tp"] * row["price_per_gpu_hour"] <= best and \
                    row["max_rate_per_replica"] >= (1 - WINDOW_MARGIN) * target_rate / fewer:
                chosen.append(row)
    return [(row["gpu"], row["tp"], row["max_num_seqs"]) for row in chosen]
