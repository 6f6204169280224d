"""The operator profile's table: one row per operator timed at one shape, declared once for the profiler
(simulator/operator_profile.py, on a GPU) and the composed cost model (simulator/composed.py, anywhere).

Each row is one operator at one shape; columns an operator does not use hold 0. Times are seconds per call,
the median of repeated calls. `graph` says how it was timed: inside a CUDA-graph replay of many calls (what a
step in a CUDA graph pays: kernel time, no launch) or eagerly one launch after another (kernel plus launch).

Operators (the columns each one sets):
  gemm                m (rows), n, k: bf16 (or the profile's dtype) x[m, k] @ w[k, n], weights rotated so
                      they come from HBM as in a forward pass, not from L2
  prefill_attention   num_seqs, query_len (new tokens per sequence), context_len (cached tokens per sequence
                      before them), num_heads, num_kv_heads, head_dim: the engine's paged prefill kernel
  decode_attention    num_seqs, context_len (tokens each sequence reads), num_heads, num_kv_heads, head_dim:
                      the engine's paged decode kernel (variant "" as eager steps and decode graphs call it,
                      "work_map" as inside mixed-step graphs)
  kv_store            m (tokens), num_kv_heads, head_dim: writing a layer's new K and V into the paged cache
  rms_norm            m, width: the fused residual-add RMSNorm
  rotary              m, num_heads, num_kv_heads, head_dim; variant "qk_norm" with Qwen3's per-head q/k norms
  silu_and_mul        m, width (the intermediate size per rank)
  embedding           m, width (hidden size)
  sampler             m (rows sampled), width (vocabulary per rank); variant "greedy" or "random"
  all_reduce          bytes (message size), tp: one all-reduce over tp GPUs (measured only where several GPUs
                      were lent; see metadata "all_reduce")
  graph_replay        m: a CUDA graph of m trivial kernels replayed: its fixed cost plus m times a kernel node
  launch              m: m trivial kernels launched eagerly one after another (launch cost per kernel)
  host_step           the engine's host time per step, fitted from real serving steps of the probe models (the
                      profile's metadata names them; never a model the profile is validated on): seconds is
                      the fitted coefficient of `variant` (step, decode_seq, prefill_seq, prefill_token,
                      mixed_step, eager_step)
  power_ramp          m, n, k (a prefill GEMM), width (microseconds it ran back to back, after an idle pause):
                      seconds per call over that chain; the card slows toward its power cap after tens of
                      milliseconds of full-rate matmuls, where the gemm rows' short bursts do not
  graph_gap           variant "decode" or "mixed" (kind of CUDA graph), m (the probe's kernels in that graph):
                      seconds per kernel that the probe's graph steps took on the device (CUDA events) beyond
                      what the composition of this profile gives them, fitted with host_step
The Parquet file's metadata holds FORMAT, VERSION and the machine (gpu name, torch/triton/CUDA versions,
date, wall seconds the profile took, the command).
"""

import pyarrow as pa

FORMAT = "twinfer-operator-profile"
VERSION = "1"

OPERATORS = (
    "gemm",
    "prefill_attention",
    "decode_attention",
    "kv_store",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "embedding",
    "sampler",
    "all_reduce",
    "graph_replay",
    "launch",
    "host_step",
    "graph_gap",
    "power_ramp",
)

OPERATOR_PROFILE_SCHEMA = pa.schema(
    [
        ("op", pa.string()),
        ("variant", pa.string()),
        ("dtype", pa.string()),
        ("graph", pa.bool_()),
        ("m", pa.int64()),
        ("n", pa.int64()),
        ("k", pa.int64()),
        ("num_seqs", pa.int64()),
        ("query_len", pa.int64()),
        ("context_len", pa.int64()),
        ("num_heads", pa.int64()),
        ("num_kv_heads", pa.int64()),
        ("head_dim", pa.int64()),
        ("width", pa.int64()),
        ("bytes", pa.int64()),
        ("tp", pa.int64()),
        ("seconds", pa.float64()),
        ("repeats", pa.int64()),
    ]
)
"""Every column but op, variant, dtype, graph and seconds defaults to 0 where an operator does not use it."""
