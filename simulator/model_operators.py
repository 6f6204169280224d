"""Which operators a model's forward calls, at which shapes per tensor-parallel rank, found in an operator profile.

Read from the engine's forward (engine/models/llama.py and engine/layers): per decoder layer a fused residual
RMSNorm, the packed qkv gemm (q/k/v biases ride in the gemm's epilogue: no extra kernel), rotary (fused with
Qwen3's per-head q/k norms: the "qk_norm" variant), the KV-cache store, paged attention, the o gemm, an
all-reduce at tp > 1, the second norm, the gate_up gemm, silu_and_mul, the down gemm and a second all-reduce.
Around the layers: the vocab-parallel embedding (an all-reduce at tp > 1), the final norm, the LM head gemm over
vocab/tp columns whose logits are all-gathered at tp > 1, and the sampler over the whole vocabulary on rank 0.
"""

import json
from dataclasses import dataclass

import numpy as np

from engine.kernels.decode_tiling import DecodeTiling, decode_partition_size
from simulator.model_shape import ModelShape, dtype_bytes
from simulator.operator_tables import Grid, OperatorProfile, choose_shape, grid_of
from simulator.roofline import HostOverheads

HOST_TERMS = ("step", "decode_seq", "prefill_seq", "prefill_token", "mixed_step", "eager_step")

# Which attention variant each kind of step runs, best first: the profiler may time a variant the schema does not
# name ("exact_table": block tables as wide as the context, as eager steps pass them; "tile_map": the prefill
# kernel as mixed-step graphs call it); without it the schema's variant stands in, as "" does for "work_map" in a
# profile of a backend without mixed-step graphs (the CPU's), where no step runs one.
DECODE_VARIANTS = {"decode_graph": ("",), "eager": ("exact_table", ""), "mixed_graph": ("work_map", "")}
PREFILL_VARIANTS = {"eager": ("",), "mixed_graph": ("tile_map", "")}

# Kernels launched per step, by launcher (torch's, or a Triton kernel's Python launcher, which costs more); counted
# from the engine's code, the TP masking's estimated. The sampler runs eagerly after any graph and is timed with its
# launches, so it is not counted here.
LAYER_KERNELS = {"torch": 4, "triton": 5}  # four gemms; two norms, rotary, KV store, silu_and_mul
TP_LAYER_KERNELS = {"torch": 2, "triton": 0}  # two all-reduces
ATTENTION_KERNELS = {"decode": 2, "prefill": 1, "mixed": 3}  # Triton; the decode kernel is split-K plus a merge
# The embedding (at tp > 1 also masking this rank's rows and an all-reduce) and the final norm.
AROUND_KERNELS = {False: {"torch": 1, "triton": 1}, True: {"torch": 6, "triton": 1}}
HEAD_KERNELS = {False: 1, True: 3}  # torch; TP: all-gather and trim the logits
ROW_GATHER_KERNELS = 1  # an eager forward picks the sampled rows' hidden states before the head


def kernel_counts(layers: int, sharded: bool, attention: str, head: bool, row_gather: bool) -> dict[str, int]:
    """Kernels a forward launches by launcher ("all" their sum): every layer, the embedding and the final norm,
    the LM head (head) and the pick of the sampled rows before it (row_gather)."""
    torch = layers * (LAYER_KERNELS["torch"] + (TP_LAYER_KERNELS["torch"] if sharded else 0))
    triton = layers * (LAYER_KERNELS["triton"] + ATTENTION_KERNELS[attention])
    torch += AROUND_KERNELS[sharded]["torch"] + (HEAD_KERNELS[sharded] if head else 0)
    torch += ROW_GATHER_KERNELS if row_gather else 0
    triton += AROUND_KERNELS[sharded]["triton"]
    return {"torch": torch, "triton": triton, "all": torch + triton}


def all_reduce_ring_seconds(message_bytes, tp: int, interconnect_bandwidth: float,
                            latency_s: float = HostOverheads().allreduce_latency_s):
    """NCCL's ring all-reduce: each GPU sends and receives 2 (tp - 1) / tp of the message, plus a per-call latency."""
    return latency_s + 2 * (tp - 1) / tp * np.asarray(message_bytes, dtype=np.float64) / interconnect_bandwidth


@dataclass(frozen=True)
class ModelOperators:
    """The curves (seconds against tokens, rows, bytes, kernels) and attention grids of one model's step."""

    token_curves: dict[str, tuple[Grid, int]]
    """Per-token operators: (curve over tokens, calls per step)."""
    lm_head: Grid
    sampler: Grid
    decode_attention: dict[str, Grid]
    """A step's decode attention (every layer's call) by kind of step (DECODE_VARIANTS), over (num_seqs,
    context_len)."""
    prefill_attention: dict[str, Grid]
    """A step's prefill attention (every layer's call) by kind of step (PREFILL_VARIANTS), over (num_seqs,
    query_len, context_len)."""
    graph_replay: Grid
    launch: dict[str, Grid]
    """Seconds to launch m kernels by launcher ("torch", "triton"), or of any kernel ("all") when the profile
    does not tell them apart."""
    host: dict[str, float]
    graph_gap: dict[str, float]
    """Seconds per kernel a CUDA-graph step's device work holds beyond its operators' times, by kind of graph
    ("decode", "mixed"; fitted on the probe's serving steps), 0 where the profile has no graph_gap rows."""
    power_ramp: tuple[np.ndarray, np.ndarray] | None
    """(seconds a prefill GEMM ran back to back, its time per call over that run / over the shortest run): the
    card's slowdown toward its power cap; None where the profile has no power_ramp rows."""
    all_reduce_measured: Grid | None
    all_reduce_source: str
    """"measured" (the profile's all_reduce rows at this tp), "nccl-ring-formula", or "none" at tp 1."""
    used_rows: np.ndarray
    """Indices of the profile rows these curves came from."""


class _Finder:
    """Looks operators up in a profile, collecting every missing one so a single error can name them all."""

    def __init__(self, profile: OperatorProfile, dtype: str) -> None:
        self.profile, self.dtype = profile, dtype
        self.problems: list[str] = []
        self.used: list[np.ndarray] = []

    def rows(self, op: str, variant: str | None = "", typed: bool = True) -> np.ndarray:
        rows = self.profile.rows_of(op, variant=variant, dtype=self.dtype if typed else None)
        if not len(rows):
            what = f"{op} rows" + (f" of variant {variant!r}" if variant else "") + (f" in {self.dtype}" if typed else "")
            present = self.profile.rows_of(op, variant=None)
            have = ""
            if len(present):
                pairs = sorted({(str(v), str(d)) for v, d in zip(self.profile.columns["variant"][present],
                                                                 self.profile.columns["dtype"][present])})
                have = " (it has " + ", ".join(f"variant {v!r} in {d}" for v, d in pairs) + ")"
            self.problems.append(f"no {what}{have}")
        return rows

    def curve(self, op: str, key: dict, size, axis: str = "m", variant: str = "") -> Grid | None:
        rows = self.rows(op, variant)
        if not len(rows):
            return None
        choice = choose_shape(self.profile, rows, tuple(key), tuple(key.values()), size)
        self.used.append(choice.rows)
        return grid_of(self.profile, choice.rows, (axis,), choice.scale)

    def attention(self, op: str, variant: str, heads: int, kv_heads: int, head_dim: int, axes: tuple,
                  calls: int) -> Grid | None:
        rows = self.rows(op, variant)
        if not len(rows):
            return None
        matching = rows[self.profile.columns["head_dim"][rows] == head_dim]
        if not len(matching):
            measured = sorted(set(self.profile.columns["head_dim"][rows].tolist()))
            self.problems.append(f"no {op} rows" + (f" of variant {variant!r}" if variant else "")
                                 + f" for head_dim {head_dim} (measured: {', '.join(map(str, measured))})")
            return None
        # Decode reads K and V once per KV head; prefill's work grows with the query heads.
        by_kv = op == "decode_attention"
        choice = choose_shape(self.profile, matching, ("num_heads", "num_kv_heads"), (heads, kv_heads),
                              lambda shape: shape[1] if by_kv else shape[0])
        self.used.append(choice.rows)
        return grid_of(self.profile, choice.rows, axes, choice.scale * calls)

    def variant(self, op: str, variants: tuple[str, ...], head_dim: int) -> str:
        """The first of these variants the profile has rows of at this head_dim (else the last, reported missing)."""
        head_dims = self.profile.columns["head_dim"]
        return next((v for v in variants if np.any(head_dims[self.profile.rows_of(op, variant=v, dtype=self.dtype)]
                                                   == head_dim)), variants[-1])

    def untyped(self, op: str, axis: str, variant: str | None = None) -> Grid | None:
        rows = self.rows(op, variant=variant, typed=False)
        if not len(rows):
            return None
        self.used.append(rows)
        return grid_of(self.profile, rows, (axis,))


def find_model_operators(profile: OperatorProfile, shape: ModelShape, tp: int, dtype: str, sampler: str,
                         interconnect_bandwidth: float | None, decode_table_tokens: int | None = None) -> ModelOperators:
    """Every operator a step of this model calls, from the profile; one ValueError names all that are missing.
    decode_table_tokens: how wide the engine's decode CUDA graphs make their block tables (its max_model_len);
    None: as wide as the profile's."""
    find = _Finder(profile, dtype)
    hidden, head_dim = shape.hidden_size, shape.head_dim
    heads, kv_heads = shape.num_attention_heads // tp, shape.num_kv_heads // tp
    intermediate = shape.intermediate_size // tp
    vocab_per_rank = -(-shape.vocab_size // tp)

    def gemm(n: int, k: int) -> Grid | None:
        return find.curve("gemm", {"n": n, "k": k}, lambda key: key[0] * key[1])

    def width(op: str, value: int, variant: str = "") -> Grid | None:
        return find.curve(op, {"width": value}, lambda key: key[0], variant=variant)

    token_curves = {
        "qkv": (gemm((heads + 2 * kv_heads) * head_dim, hidden), shape.num_layers),
        "o": (gemm(hidden, heads * head_dim), shape.num_layers),
        "gate_up": (gemm(2 * intermediate, hidden), shape.num_layers),
        "down": (gemm(hidden, intermediate), shape.num_layers),
        "rms_norm": (width("rms_norm", hidden), 2 * shape.num_layers + 1),
        "rotary": (find.curve("rotary", {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim},
                              lambda key: (key[0] + key[1]) * key[2], variant="qk_norm" if shape.qk_norm else ""),
                   shape.num_layers),
        "kv_store": (find.curve("kv_store", {"num_kv_heads": kv_heads, "head_dim": head_dim},
                                lambda key: key[0] * key[1]), shape.num_layers),
        "silu_and_mul": (width("silu_and_mul", intermediate), shape.num_layers),
        "embedding": (width("embedding", hidden), 1),
    }
    lm_head = gemm(vocab_per_rank, hidden)
    sampler_curve = width("sampler", shape.vocab_size, variant=sampler)
    decode, prefill = _attention_grids(find, heads, kv_heads, head_dim, shape.num_layers)
    profiled_width = int(profile.metadata.get("decode_table_tokens", 0) or 0)
    if (decode_table_tokens and profiled_width and decode_table_tokens != profiled_width
            and find.variant("decode_attention", DECODE_VARIANTS["eager"], head_dim) == "exact_table"
            and decode["decode_graph"] is not None and decode["eager"] is not None):
        decode["decode_graph"] = decode_graph_at_width(decode["decode_graph"], decode["eager"], profiled_width,
                                                       decode_table_tokens)
    graph_replay = find.untyped("graph_replay", "m")
    # The profiler may time torch's launches and Triton's apart (variants "torch" and "triton").
    split = all(len(profile.rows_of("launch", variant=launcher)) for launcher in ("torch", "triton"))
    launchers = ("torch", "triton") if split else ("all",)
    launch = {launcher: find.untyped("launch", "m", variant=launcher if split else None) for launcher in launchers}
    host = _host_terms(find)
    graph_gap = _graph_gaps(find)
    power_ramp = _power_ramp(find)
    measured, source = _all_reduce(find, tp, interconnect_bandwidth)
    if find.problems:
        raise ValueError(f"operator profile {profile.source} cannot compose {shape.name} tp{tp} {dtype}: "
                         + "; ".join(dict.fromkeys(find.problems)))
    return ModelOperators(token_curves, lm_head, sampler_curve, decode, prefill, graph_replay, launch, host,
                          graph_gap, power_ramp, measured, source, np.unique(np.concatenate(find.used)))


def _attention_grids(find: _Finder, heads: int, kv_heads: int, head_dim: int, layers: int):
    """Decode and prefill attention grids by kind of step, each of the best variant the profile has."""
    decode = {kind: find.attention("decode_attention", find.variant("decode_attention", variants, head_dim), heads,
                                   kv_heads, head_dim, ("num_seqs", "context_len"), layers)
              for kind, variants in DECODE_VARIANTS.items()}
    prefill = {kind: find.attention("prefill_attention", find.variant("prefill_attention", variants, head_dim), heads,
                                    kv_heads, head_dim, ("num_seqs", "query_len", "context_len"), layers)
               for kind, variants in PREFILL_VARIANTS.items()}
    return decode, prefill


def decode_graph_at_width(graph: Grid, exact: Grid, profiled_width: int, width: int) -> Grid:
    """The decode kernel of a CUDA graph whose block tables are `width` tokens wide, from the profile's (tables
    profiled_width wide) and its exact-width variant: the kernel runs a program per table partition, and those past
    a sequence's context return at once, so what a wide table costs over an exact one grows with its empty
    programs: (width - context) / (profiled_width - context) of the measured difference at each context, in
    programs where the two widths' partitions differ. A context at or past the profile's width left no empty
    program to time: it takes the cost per empty program of the nearest context below."""
    rows, contexts = graph.axes
    tiling = DecodeTiling()  # the engine's default, which its decode graphs run
    exact_seconds = exact.at(rows[:, None], contexts[None, :])
    measured = contexts < profiled_width
    per_program = np.zeros_like(graph.seconds)
    if measured.any():
        empty_profiled = (profiled_width - contexts[measured]) / decode_partition_size(profiled_width, tiling)
        per_program[:, measured] = np.maximum(graph.seconds[:, measured] - exact_seconds[:, measured], 0.0) \
            / empty_profiled
        per_program[:, ~measured] = per_program[:, np.flatnonzero(measured)[-1:]]
    empty = np.maximum(width - contexts, 0.0) / decode_partition_size(width, tiling)
    seconds = exact_seconds + per_program * empty[None, :]
    # Kept non-decreasing along both axes, as every grid is.
    return Grid(graph.axes, np.maximum.accumulate(np.maximum.accumulate(seconds, axis=0), axis=1))


def _variant_means(find: _Finder, rows: np.ndarray, variants) -> dict[str, float]:
    """Mean seconds of these rows per variant, for the variants that have rows (those rows marked used)."""
    columns = find.profile.columns
    means = {}
    for variant in variants:
        selected = rows[columns["variant"][rows] == variant]
        if len(selected):
            find.used.append(selected)
            means[variant] = float(np.mean(columns["seconds"][selected]))
    return means


def _host_terms(find: _Finder) -> dict[str, float]:
    rows = find.rows("host_step", variant=None, typed=False)
    terms = _variant_means(find, rows, HOST_TERMS)
    # The profiler leaves out a term no serving step exercised: it adds nothing then. The per-step base must be there.
    if len(rows) and "step" not in terms:
        find.problems.append("no host_step row of variant 'step'")
    return {term: terms.get(term, 0.0) for term in HOST_TERMS}


GRAPH_KINDS = ("decode", "mixed")


def _graph_gaps(find: _Finder) -> dict[str, float]:
    """graph_gap rows by kind of graph (a profile without them: none, as profiles before session 12)."""
    gaps = _variant_means(find, find.profile.rows_of("graph_gap", variant=None), GRAPH_KINDS)
    return {kind: gaps.get(kind, 0.0) for kind in GRAPH_KINDS}


def _power_ramp(find: _Finder) -> tuple[np.ndarray, np.ndarray] | None:
    """Per run length (the i-th shortest of every shape's runs), the median over shapes of its time per call over
    the shortest run's, forced non-decreasing; the run lengths are the shapes' median at that rank."""
    rows = find.profile.rows_of("power_ramp", variant=None)
    if not len(rows):
        return None
    find.used.append(rows)
    columns = find.profile.columns
    runs: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for row in rows:
        runs.setdefault((columns["n"][row], columns["k"][row]), []).append(
            (columns["width"][row] / 1e6, columns["seconds"][row]))
    lengths = min(len(run) for run in runs.values())
    if lengths < 2:
        return None
    ordered = [sorted(run)[:lengths] for run in runs.values()]
    durations = np.array([np.median([run[i][0] for run in ordered]) for i in range(lengths)])
    ratios = np.array([np.median([run[i][1] / run[0][1] for run in ordered]) for i in range(lengths)])
    return durations, np.maximum.accumulate(np.maximum(ratios, 1.0))


def power_cap_factor(ramp: tuple[np.ndarray, np.ndarray] | None, seconds) -> np.ndarray:
    """Time per call of compute-bound work that runs `seconds` back to back, over its time in a short burst: 1 up
    to the ramp's shortest run, interpolated in log time between its runs, held past the longest."""
    seconds = np.asarray(seconds, dtype=np.float64)
    if ramp is None:
        return np.ones_like(seconds)
    durations, ratios = ramp
    return np.interp(np.log(np.maximum(seconds, 1e-9)), np.log(durations), ratios, left=1.0, right=ratios[-1])


def _all_reduce(find: _Finder, tp: int, interconnect_bandwidth: float | None) -> tuple[Grid | None, str]:
    if tp == 1:
        return None, "none"
    rows = find.profile.rows_of("all_reduce", variant=None)
    rows = rows[find.profile.columns["tp"][rows] == tp]
    if len(rows):
        find.used.append(rows)
        return grid_of(find.profile, rows, ("bytes",)), "measured"
    if not interconnect_bandwidth:
        find.problems.append(f"no all_reduce rows at tp {tp}, and no interconnect bandwidth for the ring formula")
    return None, "nccl-ring-formula"


def activation_bytes(dtype: str) -> int:
    """Bytes per activation element: the model's dtype, at least bf16 (fp8 weights keep bf16 activations)."""
    return max(2, dtype_bytes(dtype))


def host_probe_layers(profile: OperatorProfile) -> int:
    """Layers of the probe model whose serving steps the host_step terms were fitted on (metadata "host_step"), or
    0 when the profile does not say. An eager step's host time is its duration less the host's wait for the device
    after its launches returned (simulator/host_step_profile.py host_seconds), so its terms include launching the
    probe's kernels: the composition takes those out again."""
    try:
        report = json.loads(profile.metadata.get("host_step", ""))
    except json.JSONDecodeError:
        return 0
    layers = report.get("probe_layers", 0) if isinstance(report, dict) else 0
    return layers if isinstance(layers, int) and layers > 0 else 0
