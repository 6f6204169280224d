"""An engine whose executor is a cost model: the simulator's twin of the real engine, configured by an EngineArgs."""

import logging

from engine.clock import VirtualClock
from engine.engine_args import EngineArgs


log = logging.getLogger(__name__)


def _dtype_name(dtype: str) -> str:
    return "bfloat16" if dtype == "auto" else dtype


def build_simulated_engine(args: EngineArgs, *, gpu: str, profile: str | None = None,
                           cost_model_kind: str | None = None, cost_model=None):
    """An engine whose executor is the cost model for this GPU and the args' model (the profile given, else the
    most trusted one, or the kind asked for: profile_library.cost_model_for), and the metadata its runs record.

    cost_model: the one an engine built here for the same arguments uses (engine.executor.cost_model), shared
    instead of made again: a planner's probes build many engines of one configuration, and composing a model
    from an operator profile takes a tenth of a second. Cost models are immutable (a composed one fills its
    tables as steps ask, each entry the same whenever it is filled)."""
    from engine.engine import Engine
    from engine.graph_dispatch import GraphDispatch, resolve_mixed_cuda_graphs
    from engine.model_config import load_model_config
    from simulator.executor import CostModelExecutor
    from simulator.gpu_specs import gpu_spec
    from simulator.kv_capacity import estimate_num_kv_blocks
    from simulator.model_shape import ModelShape
    from simulator.calibration_quality import quality_of, warn_if_poor
    from simulator.profile_library import cost_model_for

    model, tp = args.model, args.tensor_parallel_size
    model_config = load_model_config(model)
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % tp or kv_heads % tp:  # the real engine shards both and refuses such a TP at start-up
        raise ValueError(f"tensor_parallel_size {tp} must divide both {model}'s attention heads ({heads}) and "
                         f"its key/value heads ({kv_heads}), as the real engine shards them")
    dtype = _dtype_name(args.dtype)
    shared_cost_model = cost_model is not None
    try:
        spec = gpu_spec(gpu)
    except KeyError as unknown:
        if profile is None or args.num_gpu_blocks_override is None:
            raise ValueError(
                f"{unknown.args[0]}; simulating another GPU needs --profile (its calibrated cost model) and "
                "--num-gpu-blocks-override (its KV block count)"
            ) from None
        spec = None
    if spec is not None and tp > spec.gpus_per_host:
        raise ValueError(f"tensor_parallel_size {tp} needs more than one {spec.name} host ({spec.gpus_per_host} GPUs "
                         "each): tensor parallelism runs within one host, as the real engine does")
    config = args.engine_config(model_config, gpu_memory_gib=spec.memory_bytes / 2**30 if spec is not None else None)
    if cost_model is None:  # a composed model follows the engine's decode-graph width and host/device overlap
        cost_model = cost_model_for(gpu, model, tp, dtype, profile_path=profile, kind=cost_model_kind,
                                    max_model_len=config.max_model_len, async_scheduling=config.async_scheduling)
        warn_if_poor(cost_model, "used to simulate")
    num_blocks = config.num_kv_blocks or estimate_num_kv_blocks(
        spec,
        ModelShape.load(model),
        tp=tp,
        dtype=dtype,
        block_size=config.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
    )
    # The CPU executor has no CUDA graphs: its twin runs every step eagerly, as it does.
    eager = args.enforce_eager or gpu.lower() == "cpu"
    # As the real engine, whose mixed-step graphs need the triton backend ("auto" picks it at the usual
    # block sizes).
    backend = "triton" if args.attention_backend == "auto" else args.attention_backend
    mixed = not eager and resolve_mixed_cuda_graphs(args.mixed_cuda_graphs, backend, tp)
    graphs = GraphDispatch.for_engine(config.max_num_seqs, config.max_num_batched_tokens, cuda_graphs=not eager,
                                      mixed=mixed)
    executor = CostModelExecutor(cost_model, num_blocks, graphs=graphs)
    engine = Engine(config, executor, VirtualClock())
    metadata = {
        "model": model,
        "gpu": spec.name if spec is not None else gpu,
        "profile": cost_model.label,
        "calibrated": bool(cost_model.calibrated),
        "provenance": cost_model.provenance,
        "calibration_quality": quality_of(cost_model),
        "cost_model": cost_model.to_json(),
        "tensor_parallel_size": tp,
        "dtype": dtype,
        "enforce_eager": eager,
        "mixed_cuda_graphs": bool(mixed),
    }
    # A cost model given was announced by the engine that built it (a planner builds hundreds of replicas of one).
    if not shared_cost_model:
        if cost_model.provenance == "roofline":
            log.info(f"UNCALIBRATED simulation ({cost_model.label}): step times come from an analytic roofline")
        elif cost_model.provenance == "composed":
            log.info(f"composed simulation ({cost_model.label}): step times composed from timed operators")
        if config.async_scheduling and not getattr(cost_model, "async_scheduling", False):
            log.warning(f"asynchronous scheduling with {cost_model.label}: its step times are of synchronous steps "
                        "(host then device), so they come out long where the host's work would overlap the device's "
                        "(a composed model overlaps them)")
    return engine, metadata


