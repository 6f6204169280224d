"""A plausible operator profile in the schema of simulator/operator_profile_schema.py, made from roofline formulas
(an H200's copy bandwidth and matmul rate, a launch floor per kernel), for tests while no GPU profile exists."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from simulator.model_shape import ModelShape
from simulator.operator_profile_schema import FORMAT, OPERATOR_PROFILE_SCHEMA, VERSION

BANDWIDTH = 4.3e12
FLOPS = 7.8e14
ATTENTION_FLOPS = 0.5 * FLOPS
NVLINK = 360e9
FLOOR = 3e-6

TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
DECODE_SEQS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DECODE_CONTEXTS = (1, 16, 64, 256, 1024, 4096, 16384, 32768)
PREFILL_SEQS = (1, 2, 4, 8, 16)
QUERY_LENS = (1, 16, 64, 256, 1024, 4096, 8192)
PREFILL_CONTEXTS = (0, 256, 1024, 4096, 16384)
MESSAGE_BYTES = (1024, 16384, 262144, 1 << 20, 1 << 23, 1 << 26, 1 << 28)
# Host terms as the profiler fits them on a probe's serving steps (duration less the wait for the device): an eager
# step's include launching the probe's kernels (a 28-layer probe: ~3.2 ms at LAUNCH's costs).
HOST = {"step": 9e-4, "decode_seq": 4e-6, "prefill_seq": 2e-5, "prefill_token": 4e-8, "mixed_step": 1.5e-4,
        "eager_step": 3.8e-3}
PROBE = {"probe": "qwen3-1.7b", "probe_layers": 28}


def gemm_seconds(m: int, n: int, k: int) -> float:
    return max((n * k + m * (n + k)) * 2 / BANDWIDTH, 2 * m * n * k / FLOPS) + FLOOR


# What each attention variant adds to the kernel's floor: tables as wide as a graph's, or a graph's fixed layout.
DECODE_EXTRA = {"": 1e-6, "exact_table": 0.0, "work_map": 1.5e-6}
PREFILL_EXTRA = {"": 0.0, "tile_map": 2e-6}
LAUNCH = {"torch": 4.5e-6, "triton": 12e-6}


def decode_seconds(seqs: int, context: int, kv_heads: int, head_dim: int, variant: str) -> float:
    return seqs * context * kv_heads * head_dim * 4 / BANDWIDTH + 4e-6 + DECODE_EXTRA[variant]


def prefill_seconds(seqs: int, query: int, context: int, heads: int, kv_heads: int, head_dim: int,
                    variant: str = "") -> float:
    flops = 4 * seqs * query * (context + (query + 1) / 2) * heads * head_dim
    return max(flops / ATTENTION_FLOPS, seqs * (context + query) * kv_heads * head_dim * 4 / BANDWIDTH) + 5e-6 \
        + PREFILL_EXTRA[variant]


def all_reduce_seconds(message_bytes: int, tp: int) -> float:
    return 8e-6 + 2 * (tp - 1) / tp * message_bytes / NVLINK


def _row(op: str, seconds: float, *, variant: str = "", dtype: str = "bfloat16", graph: bool = True, **shape) -> dict:
    return {"op": op, "variant": variant, "dtype": dtype, "graph": graph, "seconds": seconds, "repeats": 20, **shape}


def _model_rows(shape: ModelShape, tp: int, dtype: str, head_dims: tuple[int, ...] | None,
                extra_variants: bool) -> list[dict]:
    heads, kv, hd = shape.num_attention_heads // tp, shape.num_kv_heads // tp, shape.head_dim
    hidden, inter = shape.hidden_size, shape.intermediate_size // tp
    vocab = -(-shape.vocab_size // tp)
    rows = []
    for n, k in (((heads + 2 * kv) * hd, hidden), (hidden, heads * hd), (2 * inter, hidden), (hidden, inter),
                 (vocab, hidden)):
        rows += [_row("gemm", gemm_seconds(m, n, k), dtype=dtype, m=m, n=n, k=k) for m in TOKENS]
    for m in TOKENS:
        rows.append(_row("rms_norm", 3 * m * hidden * 2 / BANDWIDTH + 2e-6, dtype=dtype, m=m, width=hidden))
        rows.append(_row("silu_and_mul", 3 * m * inter * 2 / BANDWIDTH + 2e-6, dtype=dtype, m=m, width=inter))
        rows.append(_row("embedding", 2 * m * hidden * 2 / BANDWIDTH + 1.5e-6, dtype=dtype, m=m, width=hidden))
        rows.append(_row("kv_store", 4 * m * kv * hd / BANDWIDTH + 1.5e-6, dtype=dtype, m=m, num_kv_heads=kv,
                         head_dim=hd))
        for variant, extra in (("", 0.0), ("qk_norm", 1e-6)):
            rows.append(_row("rotary", 4 * m * (heads + kv) * hd / BANDWIDTH + 2e-6 + extra, variant=variant,
                             dtype=dtype, m=m, num_heads=heads, num_kv_heads=kv, head_dim=hd))
        for variant in ("greedy", "random"):
            rows.append(_row("sampler", 2 * m * shape.vocab_size * 2 / BANDWIDTH + 5e-6, variant=variant,
                             dtype=dtype, m=m, width=shape.vocab_size))
    for attention_head_dim in head_dims or (hd,):
        rows += attention_rows(heads, kv, attention_head_dim, dtype, extra_variants)
    return rows


def attention_rows(heads: int, kv: int, head_dim: int, dtype: str = "bfloat16", extra_variants: bool = True) -> list[dict]:
    """Decode and prefill attention rows for one head shape: the schema's variants, and (extra_variants) those the
    profiler adds (decode "exact_table", prefill "tile_map")."""
    decode_variants = ("", "exact_table", "work_map") if extra_variants else ("", "work_map")
    prefill_variants = ("", "tile_map") if extra_variants else ("",)
    rows = [_row("decode_attention", decode_seconds(s, c, kv, head_dim, variant), variant=variant, dtype=dtype,
                 num_seqs=s, context_len=c, num_heads=heads, num_kv_heads=kv, head_dim=head_dim)
            for variant in decode_variants for s in DECODE_SEQS for c in DECODE_CONTEXTS]
    rows += [_row("prefill_attention", prefill_seconds(s, q, c, heads, kv, head_dim, variant), variant=variant,
                  dtype=dtype, num_seqs=s, query_len=q, context_len=c, num_heads=heads, num_kv_heads=kv,
                  head_dim=head_dim)
             for variant in prefill_variants for s in PREFILL_SEQS for q in QUERY_LENS for c in PREFILL_CONTEXTS]
    return rows


def machine_rows(all_reduce_tps: tuple[int, ...] = (2,), extra_variants: bool = True) -> list[dict]:
    """The operators that belong to the machine, not to a model: graphs, launches (by launcher with
    extra_variants), host, all-reduce."""
    rows = [_row("graph_replay", 8e-6 + 0.9e-6 * m, dtype="", m=m) for m in (1, 10, 100, 1000, 4000)]
    launchers = LAUNCH if extra_variants else {"": 6e-6}
    rows += [_row("launch", 2e-6 + seconds * m, variant=variant, dtype="", graph=False, m=m)
             for variant, seconds in launchers.items() for m in (1, 10, 100, 1000, 4000)]
    rows += [_row("host_step", seconds, variant=term, dtype="", graph=False) for term, seconds in HOST.items()]
    rows += [_row("all_reduce", all_reduce_seconds(b, tp), dtype="", bytes=b, tp=tp)
             for tp in all_reduce_tps for b in MESSAGE_BYTES]
    return rows


def synthetic_operator_profile(path: str | Path, *, models=("qwen3-0.6b", "qwen3-8b"), tps=(1, 2),
                               dtype: str = "bfloat16", head_dims: tuple[int, ...] | None = None,
                               all_reduce_tps: tuple[int, ...] = (2,), drop_ops: tuple[str, ...] = (),
                               extra_variants: bool = True, probe: dict | None = PROBE, gpu: str = "h200") -> Path:
    """Write a profile covering these models at these TPs (every row the composition needs), less drop_ops;
    attention timed at head_dims instead of the models' own when given; extra_variants: also the variants the
    profiler adds beyond the schema's (decode "exact_table", prefill "tile_map", launches "torch" and "triton");
    probe: the metadata's account of the model the host terms were fitted on (None: not said)."""
    rows = machine_rows(all_reduce_tps, extra_variants)
    for model in models:
        shape = ModelShape.load(model)
        for tp in tps:
            rows += _model_rows(shape, tp, dtype, head_dims, extra_variants)
    rows = [row for row in rows if row["op"] not in drop_ops]
    # Models sharing a shape (two TPs of one model, say) repeat rows: keep one of each.
    unique = {tuple(sorted(row.items())): row for row in rows}
    metadata = {"format": FORMAT, "version": VERSION, "gpu": gpu, "gpu_name": f"synthetic {gpu}",
                "command": "tests/synthetic_operators.py", "host_step": json.dumps(probe) if probe else "not measured",
                "decode_table_tokens": "32768"}
    table = pa.Table.from_pylist(list(unique.values()), schema=OPERATOR_PROFILE_SCHEMA.with_metadata(metadata))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
