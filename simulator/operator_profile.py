"""Operator profile: the operators an engine step is made of, timed on one GPU over shape grids that cover every
supported model family at any size and TP, written as one Parquet table (simulator/operator_profile_schema.py)
from which the composed cost model predicts models that were never profiled.

Every operator runs through the engine's own code: F.linear as its linear layers call it, the attention
backend the engine picks (on a GPU the Triton paged prefill and decode kernels, with the decode work map and
prefill tile map that mixed-step CUDA graphs use), the fusable norm, rotary and SwiGLU functions, the embedding
module and the sampler. On a GPU each shape is timed inside a CUDA graph of many calls, replayed, divided by
the calls: what a step in a graph pays. Weights and KV caches rotate over enough copies to overflow L2, so each
call reads them from HBM as layer after layer does. The sampler, which the engine runs outside its graphs, is
timed eagerly.

Tables run in order of importance, each until its share of the time budget is spent (a cut table keeps what
it has, and the metadata names it): gemm of the presets' linear layers, decode and prefill attention of their
head layouts, the elementwise operators, graph-replay and launch overheads, the slowdown of long matmul runs
toward the power cap, the engine's host time per step and its graph steps' device time beyond the composition
(the real engine serving a Poisson load on a probe model no profile is validated on), all-reduce where several
GPUs are lent, then a general gemm grid for unseen sizes. On the CPU, --quick runs tiny grids end to end.
This module runs them and writes the file; the shapes are operator_shapes.py's, the timing operator_timing.py's,
the tables gemm_profile (power_ramp too), attention_profile, elementwise_profile, overhead_profile, host_step_profile and
all_reduce_profile.

    twinfer profile --operators --out FILE.parquet [--max-seconds 420] [--quick] [--tables gemm,...]
    twinfer profile --operators --tables rms_norm,rotary --update FILE.parquet --out FILE.parquet   (re-measure)
"""

import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from simulator.all_reduce_profile import all_reduce_table
from simulator.host_step_profile import host_step_table
from simulator.attention_profile import decode_attention_table, prefill_attention_table
from simulator.elementwise_profile import (embedding_table, kv_store_table, rms_norm_table, rotary_table, sampler_table,
                                           silu_and_mul_table)
from simulator.gemm_profile import gemm_table, general_gemm_table, power_ramp_table
from simulator.operator_profile_schema import FORMAT, OPERATOR_PROFILE_SCHEMA, VERSION
from simulator.operator_shapes import BLOCK_SIZE, FULL_GRID, OperatorGrid, quick_grid, supported_models
from simulator.overhead_profile import graph_replay_table, launch_table
from simulator.operator_timing import OperatorTimer, ProfileContext, TableRun, measure_ceilings, release_memory

MAX_FILE_BYTES = 16 << 20
"""The device machine returns files up to 16 MiB."""


# Tables in order of importance, with their share of the time budget; a table may use what earlier ones left.
TABLES = (
    ("gemm", 0.20, gemm_table),
    ("decode_attention", 0.20, decode_attention_table),
    ("prefill_attention", 0.10, prefill_attention_table),
    ("kv_store", 0.015, kv_store_table),
    ("rms_norm", 0.02, rms_norm_table),
    ("rotary", 0.04, rotary_table),
    ("silu_and_mul", 0.04, silu_and_mul_table),
    ("embedding", 0.015, embedding_table),
    ("sampler", 0.02, sampler_table),
    ("graph_replay", 0.01, graph_replay_table),
    ("launch", 0.01, launch_table),
    ("power_ramp", 0.02, power_ramp_table),
    ("host_step", 0.19, host_step_table),
    ("all_reduce", 0.04, all_reduce_table),
    ("gemm_general", 0.08, general_gemm_table),
)


def profile_operators(out_path, *, device: str = "cuda", dtype: str = "bfloat16", max_seconds: float = 420.0,
                      grid: OperatorGrid | None = None, tables: tuple[str, ...] | None = None, base=None,
                      log=print) -> Path:
    """Time every table (or those named) within max_seconds (setup and writing included) and write the Parquet
    file; its path. base: the profile these tables will be merged into (--update), for the fits that compose
    from the whole profile (the host-step table's graph gaps)."""
    import torch

    started = time.perf_counter()
    out_path = Path(out_path)
    with one_thread_on_cpu(torch.device(device)), torch.inference_mode():
        context = profile_context(torch.device(device), getattr(torch, dtype), grid)
        if base is not None:
            context.base_table = read_operator_profile(base)
        metadata = _metadata(context, max_seconds)
        log(f"operator profile: {metadata['gpu_name']}, {context.dtype_name}, {len(context.models)} models, "
            f"budget {max_seconds:.0f} s; ceilings {context.ceilings.flops / 1e12:.0f} TFLOP/s, "
            f"{context.ceilings.bandwidth / 1e12:.2f} TB/s, L2 {context.ceilings.l2_bytes >> 20} MiB")
        usable = max_seconds - min(10.0, 0.03 * max_seconds)  # time to write the file and exit
        rows, summary = context.measured_rows, []
        for name, deadline, table in _schedule(context, started, usable, tables):
            run = TableRun(name, deadline, context, log)
            try:
                with run.guard(f"the {name} table"):
                    table(run, context)
            finally:
                rows += run.rows
                summary.append((name, len(run.rows), time.perf_counter() - run.started, run.errors, run.cut))
                log(f"{name}: {len(run.rows)} rows in {summary[-1][2]:.1f} s"
                    f"{', cut at its deadline' if run.cut else ''}{f', {run.errors} errors' if run.errors else ''}")
                context.mixed_graph_cache.clear()
                release_memory(context.device)
                _finish_metadata(metadata, context, summary, started)
                write_operator_profile(rows, metadata, out_path)
    _print_summary(summary, rows, out_path, metadata, log)
    return out_path


@contextlib.contextmanager
def one_thread_on_cpu(device):
    """On the CPU (a check that every operator runs, whose times mean nothing) one thread: a busy machine's
    oversubscribed threads would make it many times slower."""
    import torch

    if device.type == "cuda":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def profile_context(device, dtype, grid: OperatorGrid | None) -> ProfileContext:
    import torch
    from engine.attention import load_backend, resolve_backend_name

    on_cuda = device.type == "cuda"
    if on_cuda:
        from engine.layers.fusion import enable_fusion

        if device.index is None:  # set_device (and MixedStepGraphs) want the index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        enable_fusion()  # the norms, rotary, SwiGLU gate and sampler run as the engine runs them on a GPU
    grid = grid or (FULL_GRID if on_cuda else quick_grid())
    torch.manual_seed(0)
    name = grid.attention_backend
    backend = load_backend(name if name == "triton" else resolve_backend_name(name, device, BLOCK_SIZE))
    models = grid.models or supported_models()
    return ProfileContext(device, dtype, grid, OperatorTimer(on_cuda, repeats=5 if on_cuda else 3),
                          measure_ceilings(device, dtype), backend,
                          models)


def _schedule(context: ProfileContext, started: float, usable: float, tables: tuple[str, ...] | None = None):
    """(name, deadline, table) in order: each table's deadline ends its cumulative share of the usable time."""
    import torch

    unknown = set(tables or ()) - {name for name, _, _ in TABLES}
    if unknown:
        raise ValueError(f"unknown operator tables {sorted(unknown)}; known: {', '.join(name for name, _, _ in TABLES)}")
    several_gpus = context.timer.on_cuda and torch.cuda.device_count() > 1
    shares = [(name, share if name != "all_reduce" or several_gpus else 0.0, table) for name, share, table in TABLES
              if tables is None or name in tables]
    total = sum(share for _, share, _ in shares)
    elapsed = time.perf_counter() - started
    cumulative = 0.0
    for name, share, table in shares:
        cumulative += share / total
        yield name, started + elapsed + (usable - elapsed) * cumulative, table


def _metadata(context: ProfileContext, max_seconds: float) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    on_cuda = context.timer.on_cuda
    gpu_name = torch.cuda.get_device_name(context.device) if on_cuda else f"cpu ({os.cpu_count()} cores)"
    from simulator.gpu_specs import gpu_key

    grid = context.grid
    return {
        "format": FORMAT, "version": VERSION, "gpu": gpu_key(gpu_name) if on_cuda else "cpu", "gpu_name": gpu_name,
        "device_count": torch.cuda.device_count() if on_cuda else 0, "dtype": context.dtype_name,
        "torch_version": torch.__version__, "triton_version": triton_version, "cuda_version": torch.version.cuda or "",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "max_seconds": max_seconds, "attention_backend": context.backend.name,
        "models": json.dumps([dims.name for dims in context.models]), "tp_candidates": json.dumps(grid.tp_candidates),
        "block_size": BLOCK_SIZE, "l2_bytes": context.ceilings.l2_bytes,
        "matmul_flops_per_s": round(context.ceilings.flops), "copy_bytes_per_s": round(context.ceilings.bandwidth),
        "decode_table_tokens": grid.decode_table_tokens, "mixed_graph_seqs": grid.mixed_graph_seqs,
        "mixed_graph_tokens": grid.mixed_graph_tokens,
        "timing": TIMING_NOTE, "variants": json.dumps(VARIANT_NOTES),
    }


TIMING_NOTE = (
    "seconds per call, the median of repeated samples; graph rows: a replayed CUDA graph of many calls divided by "
    "their count (weights and KV caches rotated past the L2); other rows eager, one launch after another; "
    "graph_replay: host clock from replay to done, for a graph of m one-element kernels; launch: host clock of m "
    "eager launches until done (one row is the whole burst); host_step: a fitted coefficient, seconds per unit")
VARIANT_NOTES = {
    "decode_attention/": "block tables as wide as decode CUDA graphs make them (decode_table_tokens)",
    "decode_attention/exact_table": "block tables as wide as the context (eager steps)",
    "decode_attention/work_map": "as inside a mixed-step CUDA graph: mixed_graph_seqs rows (padding after the "
                                 "decodes), the decode work map of a graph of mixed_graph_tokens tokens",
    "prefill_attention/": "as eager steps run it, the grid bounded by the longest chunk",
    "prefill_attention/tile_map": "as inside a mixed-step CUDA graph: mixed_graph_seqs rows, the prefill tile map",
    "rotary/qk_norm": "with Qwen3's per-head q/k RMSNorm in the same kernel",
    "launch/torch": "a one-element torch kernel", "launch/triton": "the engine's Triton SwiGLU gate on one token",
    "host_step/*": "the probe's host seconds per step (step), per decode sequence (decode_seq), per prefill chunk "
                   "(prefill_seq), per prefill token (prefill_token), per step with both (mixed_step), per eager step "
                   "(eager_step: launching the probe's forward, which overlaps its GPU work; scale by layers, "
                   "metadata host_step's probe_layers); measured at TP 1",
}


def _finish_metadata(metadata: dict, context: ProfileContext, summary, started: float) -> None:
    """The metadata as it stands after a table: tables cut, errors, seconds so far, the host fit, all-reduce."""
    metadata["tables"] = json.dumps({name: {"rows": rows, "seconds": round(seconds, 1), "errors": errors, "cut": cut}
                                     for name, rows, seconds, errors, cut in summary})
    metadata["complete"] = len(summary) == len(TABLES) and not any(cut for *_, cut in summary)
    metadata["errors"] = sum(errors for _, _, _, errors, _ in summary)
    metadata["seconds"] = round(time.perf_counter() - started, 1)
    metadata["all_reduce"] = getattr(context, "all_reduce_note", "not measured")
    report = getattr(context, "host_report", None)
    metadata["host_step"] = json.dumps(report) if report else "not measured"


def write_operator_profile(rows: list[dict], metadata: dict, out_path: Path) -> pa.Table:
    """Write the rows with the metadata in the schema, atomically; the table."""
    schema = OPERATOR_PROFILE_SCHEMA.with_metadata({key: str(value) for key, value in metadata.items()})
    table = pa.Table.from_pylist(rows, schema=schema)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(out_path.name + ".tmp")
    pq.write_table(table, temporary, compression="zstd")
    temporary.replace(out_path)
    return table


def read_operator_profile(path) -> pa.Table:
    """Read a profile, checking its format, version and columns."""
    table = pq.read_table(path)
    metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} file")
    if not table.schema.remove_metadata().equals(OPERATOR_PROFILE_SCHEMA):
        raise ValueError(f"{path}: columns differ from OPERATOR_PROFILE_SCHEMA")
    return table


TABLE_METADATA = {"host_step": "host_step", "all_reduce": "all_reduce"}
"""Metadata keys that give a table's own account (the host fit's report and its probe; how all-reduce was timed)."""


def replace_tables(base: pa.Table, update: pa.Table, *, base_name: str = "base", update_name: str = "update") -> pa.Table:
    """The base profile with every operator the update holds re-measured: the base's rows of those operators
    dropped, the update's appended; the metadata stays the base's but for the replaced tables' own accounts
    (TABLE_METADATA), with "remeasured" naming each replaced table's
    date and command. Both must come from the same kind of GPU and dtype."""
    meta = {key.decode(): value.decode() for key, value in (base.schema.metadata or {}).items()}
    new = {key.decode(): value.decode() for key, value in (update.schema.metadata or {}).items()}
    for key in ("gpu", "dtype", "attention_backend"):
        if meta.get(key) != new.get(key):
            raise ValueError(f"{update_name} was timed with {key}={new.get(key)!r}, {base_name} with "
                             f"{meta.get(key)!r}: their rows cannot be mixed")
    ops = sorted(set(update.column("op").to_pylist()))
    if not ops:
        raise ValueError(f"{update_name} has no rows to put in {base_name}")
    keep = pa.compute.invert(pa.compute.is_in(base.column("op"), value_set=pa.array(ops)))
    rows = pa.concat_tables([base.filter(keep).replace_schema_metadata(None), update.replace_schema_metadata(None)])
    remeasured = json.loads(meta.get("remeasured", "{}"))
    remeasured.update({op: {"date": new.get("date"), "command": new.get("command"), "gpu_name": new.get("gpu_name")}
                       for op in ops})
    meta["remeasured"] = json.dumps(remeasured)
    # A table's account in the metadata follows its rows.
    for op, key in TABLE_METADATA.items():
        if op in ops and key in new:
            meta[key] = new[key]
    tables, updated_tables = json.loads(meta.get("tables", "{}")), json.loads(new.get("tables", "{}"))
    meta["tables"] = json.dumps({**tables, **{op: updated_tables[op] for op in ops if op in updated_tables}})
    return rows.replace_schema_metadata(meta)


def update_operator_profile(base_path, update_path, out_path) -> pa.Table:
    """Write base_path's profile with update_path's operators replacing its own to out_path (may be base_path)."""
    table = replace_tables(read_operator_profile(base_path), read_operator_profile(update_path),
                           base_name=str(base_path), update_name=str(update_path))
    meta = {key.decode(): value.decode() for key, value in table.schema.metadata.items()}
    return write_operator_profile(table.to_pylist(), meta, Path(out_path))


def _print_summary(summary, rows: list[dict], out_path: Path, metadata: dict, log) -> None:
    log(f"{'table':<18} {'rows':>6} {'seconds':>8} {'errors':>6}  status")
    for name, count, seconds, errors, cut in summary:
        log(f"{name:<18} {count:>6} {seconds:>8.1f} {errors:>6}  {'cut' if cut else 'done'}")
    size = out_path.stat().st_size
    warning = " (over the device's 16 MiB file limit!)" if size > MAX_FILE_BYTES else ""
    log(f"wrote {len(rows)} rows to {out_path} ({size / 1024:.0f} KiB{warning}) in {metadata['seconds']} s; "
        f"complete: {metadata['complete']}; all_reduce: {metadata['all_reduce']}")
