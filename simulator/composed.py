"""The composed cost model: a step's time summed from operators timed once per GPU, for any model, size, dtype and TP.

A step is seen as the executor sees it (engine/stats.py BatchFeatures and the CUDA-graph size G). With P prefill
and D decode sequences, N batched tokens, T = G or N the padded tokens, R = P + D the rows sampled, L layers and
all shapes per tensor-parallel rank (simulator/model_operators.py says which operators at which shapes):

  tokens(T)  = L * (gemm qkv + gemm o + gemm gate_up + gemm down + 2 rms_norm + rotary + kv_store + silu_and_mul
                    + 2 all_reduce(T * hidden bytes))  + embedding + rms_norm + all_reduce(T * hidden bytes)
               (all-reduces only at tp > 1: measured by message size where the profile has them, else NCCL's
               ring formula over the card's interconnect)
               + gemms(T) * (power_cap(gemms(T)) - 1): GEMMs that run back to back for tens of milliseconds slow
               toward the card's power cap (the profile's power_ramp rows; 1 for short steps)
  head(H)    = gemm(H, vocab / tp, hidden) + all_gather of the logits (as an all-reduce of half their bytes)
               H = G inside a decode graph (the LM head is captured in it), else R
  attention  = L calls of: a step of one-token rows only (N == R): the decode kernel over R rows at their mean
               context ((decode_context + prefill_context + P) / R); else the prefill kernel at P sequences of mean
               query N_prefill / P and mean context prefill_context / P, scaled by prefill_attention_work over the
               work of P such mean sequences, plus the decode kernel over D rows at mean context decode_context / D.
               Variants by kind of step (simulator/model_operators.py): decode graphs "" (tables as wide as the
               profile's, brought to the engine's max_model_len with "exact_table": decode_graph_at_width), eager
               steps "exact_table" (else ""), mixed-step graphs "work_map" and prefill "tile_map" (else "")
  gpu        = tokens(T) + (head(H) + sampler(R)) + attention
  host       = step + decode_seq D + prefill_seq P + prefill_token N_prefill + mixed_step [P and D]
               + (eager_step - probe launches) [no graph]                    (the profile's host_step terms)
               (host_step was fitted as a graph step's duration less its device work, an eager step's less the
               host's wait after its launches, so an eager step's terms include launching the probe model's
               kernels: taken out when the metadata names the probe's layers, since this model's own launches
               are in the max below)
  duration   = host + (gpu + graph_replay(K) - K * spacing + K * graph_gap)  in a CUDA graph of K kernels
               (spacing: graph_replay's slope per kernel, which every operator timed in a graph already holds;
               graph_gap: what the probe's graph steps took on the device beyond this composition, per kernel)
             = host + max(launches, gpu)                                    eagerly: launches overlap the GPU
               launches = launch_torch(torch kernels) + launch_triton(Triton kernels), or launch(all kernels)
               when the profile does not time the launchers apart; kernels counted per layer x L plus those around
  With asynchronous scheduling the host's work for a step overlaps the device's previous one, so a step lasts
  the longer of the two: max(host, gpu + replay term) in a graph, max(host + launches, gpu) eagerly (H200,
  Qwen3-8B on the Azure slice: the real decode steps lasted the composed GPU part + 0.1 ms, where the same
  load served synchronously took host + GPU).

Every operator is interpolated from its table by simulator/operator_tables.py's rules. The token-proportional
terms are precomputed per T (arrays grown on demand), so predict() is a few list lookups and one small
interpolation per attention kernel.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.stats import BatchFeatures
from simulator.gpu_specs import gpu_key
from simulator.model_operators import (
    activation_bytes,
    all_reduce_ring_seconds,
    find_model_operators,
    host_probe_layers,
    kernel_counts,
    power_cap_factor,
)

GEMM_PARTS = ("qkv", "o", "gate_up", "down")
from simulator.model_shape import ModelShape
from simulator.operator_shapes import BLOCK_SIZE
from simulator.operator_tables import OperatorProfile, linear, linear_increasing, position

FORMAT = "twinfer-composed-cost-model"
FORMAT_VERSION = 1
INITIAL_TOKENS = 8193
"""Per-token tables start covering this many tokens (vLLM's largest default batch) and double when a step needs more."""


@dataclass(frozen=True, eq=False)
class ComposedCostModel:
    """Step times composed from an operator profile for one (model shape, tp, dtype); never fitted on the model."""

    shape: ModelShape
    profile: OperatorProfile = field(repr=False)
    tp: int = 1
    dtype: str = "bfloat16"
    interconnect_bandwidth: float | None = None
    """Bytes/s per GPU to its peers, for the ring formula when the profile has no all_reduce rows at this tp."""
    sampler: str = "greedy"
    """The sampler variant timed (trace replays sample greedily)."""
    max_model_len: int | None = None
    """The engine's: its decode CUDA graphs' block tables are this wide (None: as wide as the profile's)."""
    async_scheduling: bool = False
    """The engine's: the host prepares each step while the device runs the one before."""

    calibrated = False
    provenance = "composed"

    def __post_init__(self) -> None:
        if not isinstance(self.tp, int) or isinstance(self.tp, bool) or self.tp < 1:
            raise ValueError(f"composed cost model tp must be a positive integer, got {self.tp!r}")
        for what, count in (("attention heads", self.shape.num_attention_heads),
                            ("key/value heads", self.shape.num_kv_heads)):
            if count % self.tp:
                raise ValueError(f"tp={self.tp} does not divide model {self.shape.name!r}'s {count} {what}")
        width = None if self.max_model_len is None else -(-self.max_model_len // BLOCK_SIZE) * BLOCK_SIZE
        operators = find_model_operators(self.profile, self.shape, self.tp, self.dtype, self.sampler,
                                         self.interconnect_bandwidth, decode_table_tokens=width)
        self._set("operators", operators)
        self._set_kernel_costs()
        # Attention by kind of step: rows (and planes) per number of sequences, filled as steps ask for them.
        self._set("_decode_rows", {kind: {} for kind in operators.decode_attention})
        self._set("_decode_knots", {kind: grid.axes[1].tolist() for kind, grid in operators.decode_attention.items()})
        self._set("_prefill_planes", {kind: {} for kind in operators.prefill_attention})
        self._set("_prefill_knots", {kind: (grid.axes[1].tolist(), grid.axes[2].tolist())
                                     for kind, grid in operators.prefill_attention.items()})
        self._grow(INITIAL_TOKENS - 1)

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    @property
    def gpu(self) -> str:
        return gpu_key(self.profile.gpu)

    @property
    def all_reduce_source(self) -> str:
        """"measured", "nccl-ring-formula" or "none" (tp 1): where the all-reduce times come from."""
        return self.operators.all_reduce_source

    @property
    def label(self) -> str:
        source = Path(self.profile.source).name
        reduce = "" if self.tp == 1 else f"; all-reduce {self.all_reduce_source}"
        overlap = "; host overlapped (async scheduling)" if self.async_scheduling else ""
        return f"composed {self.gpu} {self.shape.name} tp{self.tp} {self.dtype} (operators {source}{reduce}{overlap})"

    # --- tables -------------------------------------------------------------------------------------------

    def _all_reduce(self, message_bytes: np.ndarray) -> np.ndarray:
        if self.tp == 1:
            return np.zeros(np.shape(message_bytes))
        measured = self.operators.all_reduce_measured
        if measured is not None:
            return measured.at(message_bytes)
        return all_reduce_ring_seconds(message_bytes, self.tp, self.interconnect_bandwidth)

    def _token_parts(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Seconds per step of each token-proportional operator at these padded token counts."""
        parts = {name: calls * curve.at(tokens) for name, (curve, calls) in self.operators.token_curves.items()}
        # A step's GEMMs run back to back for as long as they take: past tens of milliseconds the card slows toward
        # its power cap, which the gemm rows (short bursts) never see (power_ramp rows).
        if self.operators.power_ramp is not None:
            gemm = sum(parts[name] for name in GEMM_PARTS if name in parts)
            parts["power_cap"] = gemm * (power_cap_factor(self.operators.power_ramp, gemm) - 1.0)
        if self.tp > 1:
            message = tokens * (self.shape.hidden_size * activation_bytes(self.dtype))
            parts["all_reduce"] = (2 * self.shape.num_layers + 1) * self._all_reduce(message)
        return parts

    def _grow(self, tokens: int) -> None:
        """(Re)build the per-token tables to cover `tokens`; each entry depends on its index alone."""
        size = max(2 * getattr(self, "_size", 0), tokens + 1)
        counts = np.arange(size, dtype=np.float64)
        token = np.zeros(size)
        for part in self._token_parts(counts).values():
            token = token + part
        logits_bytes = counts * (-(-self.shape.vocab_size // self.tp) * self.tp * activation_bytes(self.dtype))
        head = self.operators.lm_head.at(counts)
        if self.tp > 1:
            head = head + self._all_reduce(logits_bytes / 2)
        sampler = self.operators.sampler.at(counts)
        for table in (token, head, sampler):
            table[0] = 0.0
        self._set("_size", size)
        self._set("_token_np", token)
        self._set("_head_np", head)
        self._set("_sampler_np", sampler)
        self._set("_token", token.tolist())
        self._set("_head", head.tolist())
        self._set("_sampler", sampler.tolist())

    def _set_kernel_costs(self) -> None:
        """Graph replay and eager launch seconds of each kind of step, from its kernel counts."""
        layers, sharded = self.shape.num_layers, self.tp > 1
        replay, launch = self.operators.graph_replay, self.operators.launch

        # graph_replay(m) is the host clock of a graph of m one-element kernels, replayed and waited for: a fixed
        # cost plus each kernel's spacing inside a graph. Every operator's seconds were timed inside a graph of many
        # calls, so they hold that spacing already; a step pays only the rest, replay(m) - m * spacing.
        nodes = replay.axes[0]
        spacing = (float(replay.at(nodes[-1])) - float(replay.at(nodes[0]))) / (nodes[-1] - nodes[0]) \
            if len(nodes) > 1 else 0.0

        # A graph step's device work also holds a little per kernel that its operators, each timed alone, do not
        # (graph_gap, fitted on the probe's serving steps against this composition).
        gaps = self.operators.graph_gap

        def replayed(attention: str, head: bool) -> float:
            kernels = kernel_counts(layers, sharded, attention, head, row_gather=False)["all"]
            return max(0.0, float(replay.at(kernels)) - kernels * spacing) + kernels * gaps[attention]

        def launched(attention: str) -> float:
            counts = kernel_counts(layers, sharded, attention, head=True, row_gather=True)
            return sum(float(curve.at(counts[launcher])) for launcher, curve in launch.items())

        self._set("_replay_decode", replayed("decode", head=True))  # decode graphs capture the LM head
        self._set("_replay_mixed", replayed("mixed", head=False))
        self._set("_launch_single", launched("decode"))
        self._set("_launch_prefill", launched("prefill"))
        self._set("_launch_mixed", launched("mixed"))
        # The host terms of an eager step hold the probe's launches (of a step with prompt chunks and decodes, at
        # tp 1, the kind most of its eager serving steps are); this model's own are in max(launches, gpu).
        probe_layers = host_probe_layers(self.profile)
        probe = kernel_counts(probe_layers, False, "mixed", head=True, row_gather=True) if probe_layers else None
        probe_launches = sum(float(curve.at(probe[launcher])) for launcher, curve in launch.items()) if probe else 0.0
        self._set("probe_launches", probe_launches)
        terms = self.operators.host
        self._set("_host_terms", {**terms, "eager_step": terms["eager_step"] - probe_launches})

    def _decode_row(self, kind: str, num_seqs: int) -> list[float]:
        rows = self._decode_rows[kind]
        row = rows.get(num_seqs)
        if row is None:
            row = rows[num_seqs] = self.operators.decode_attention[kind].along_first([num_seqs])[0].tolist()
        return row

    def _prefill_plane(self, kind: str, num_seqs: int) -> list[list[float]]:
        planes = self._prefill_planes[kind]
        plane = planes.get(num_seqs)
        if plane is None:
            plane = planes[num_seqs] = self.operators.prefill_attention[kind].along_first([num_seqs])[0].tolist()
        return plane

    # --- one step -----------------------------------------------------------------------------------------

    def _host(self, num_prefill_seqs: int, num_prefill_tokens: int, num_decode_seqs: int, eager: bool) -> float:
        terms = self._host_terms
        host = (terms["step"] + terms["prefill_seq"] * num_prefill_seqs + terms["decode_seq"] * num_decode_seqs
                + terms["prefill_token"] * num_prefill_tokens)
        if num_prefill_seqs and num_decode_seqs:
            host += terms["mixed_step"]
        if eager:
            host += terms["eager_step"]
        return host

    def _fixed(self, tokens: int, head_rows: int, sampled_rows: int) -> float:
        return self._token[tokens] + (self._head[head_rows] + self._sampler[sampled_rows])

    def _decode(self, kind: str, num_seqs: int, context_tokens: int) -> float:
        return linear(self._decode_knots[kind], self._decode_row(kind, num_seqs), context_tokens / num_seqs)

    def _prefill(self, kind: str, num_seqs: int, num_tokens: int, context_tokens: int, attention_work: float) -> float:
        query, context = num_tokens / num_seqs, context_tokens / num_seqs
        plane = self._prefill_plane(kind, num_seqs)
        query_knots, context_knots = self._prefill_knots[kind]
        query_low, query_high, query_weight = position(query_knots, query)
        low, high, weight = position(context_knots, context)
        row = plane[query_low]
        below = row[low] + weight * (row[high] - row[low])
        row = plane[query_high]
        above = row[low] + weight * (row[high] - row[low])
        seconds = below + query_weight * (above - below)
        # Sequences of unequal lengths do more query-key work than P sequences of the mean length.
        mean_work = num_seqs * query * (context + (query + 1) / 2)
        return seconds * (attention_work / mean_work) if mean_work > 0 and attention_work > 0 else seconds

    def _attention(self, features: BatchFeatures, graph: int, single: bool) -> float:
        num_prefill, num_decode = features.num_prefill_seqs, features.num_decode_seqs
        if single:  # every row one token: the decode kernel takes them all, one-token prompt chunks too
            context = features.decode_context_tokens + features.prefill_context_tokens + num_prefill
            return self._decode("decode_graph" if graph else "eager", num_prefill + num_decode, context)
        kind = "mixed_graph" if graph else "eager"
        attention = 0.0
        if num_prefill:
            attention = self._prefill(kind, num_prefill, features.num_prefill_tokens, features.prefill_context_tokens,
                                      features.prefill_attention_work)
        if num_decode:
            attention = attention + self._decode(kind, num_decode, features.decode_context_tokens)
        return attention

    def _launches(self, single: bool, num_decode: int) -> float:
        return self._launch_single if single else self._launch_mixed if num_decode else self._launch_prefill

    def predict(self, features: BatchFeatures, cuda_graph_batch_size: int = 0) -> float:
        """Predicted seconds of one step with this batch (cuda_graph_batch_size 0: ran eagerly)."""
        graph = cuda_graph_batch_size
        tokens = graph or features.num_batched_tokens
        if tokens >= self._size:
            self._grow(tokens)
        num_prefill, num_decode = features.num_prefill_seqs, features.num_decode_seqs
        rows = num_prefill + num_decode
        single = features.num_batched_tokens == rows
        host = self._host(num_prefill, features.num_prefill_tokens, num_decode, not graph)
        gpu = self._fixed(tokens, graph if graph and single else rows, rows) + self._attention(features, graph, single)
        if self.async_scheduling:
            if graph:
                return max(host, gpu + (self._replay_decode if single else self._replay_mixed))
            return max(host + self._launches(single, num_decode), gpu)
        if graph:
            return host + (gpu + (self._replay_decode if single else self._replay_mixed))
        return host + max(self._launches(single, num_decode), gpu)

    def predict_decode_run(self, num_decode_seqs: int, decode_context_tokens: int, num_steps: int,
                           cuda_graph_batch_size: int = 0) -> list[float]:
        """Durations of num_steps pure-decode steps whose context grows by num_decode_seqs a step.

        predict()'s operations in predict()'s order with the step-invariant ones hoisted: bit for bit its answers.
        """
        graph = cuda_graph_batch_size
        tokens = graph or num_decode_seqs
        if tokens >= self._size:
            self._grow(tokens)
        host = self._host(0, 0, num_decode_seqs, not graph)
        fixed = self._fixed(tokens, graph or num_decode_seqs, num_decode_seqs)
        contexts = [(decode_context_tokens + step * num_decode_seqs) / num_decode_seqs for step in range(num_steps)]
        kind = "decode_graph" if graph else "eager"
        attention = linear_increasing(self._decode_knots[kind], self._decode_row(kind, num_decode_seqs), contexts)
        gpus = [fixed + seconds for seconds in attention]
        if self.async_scheduling:
            if graph:
                replay = self._replay_decode
                return [max(host, gpu + replay) for gpu in gpus]
            launched = host + self._launch_single
            return [max(launched, gpu) for gpu in gpus]
        if graph:
            replay = self._replay_decode
            return [host + (gpu + replay) for gpu in gpus]
        launches = self._launch_single
        return [host + max(launches, gpu) for gpu in gpus]

    # --- many steps ---------------------------------------------------------------------------------------

    def predict_columns(self, columns: dict) -> np.ndarray:
        """Vectorized predictions for step columns (as in steps.parquet); equal to predict() up to rounding."""
        get = {name: np.asarray(columns[name], dtype=np.float64) for name in (
            "num_prefill_seqs", "num_prefill_tokens", "num_decode_seqs", "decode_context_tokens",
            "prefill_context_tokens", "prefill_attention_work", "num_batched_tokens", "cuda_graph_batch_size")}
        graph = get["cuda_graph_batch_size"]
        prefill, decode, batched = get["num_prefill_seqs"], get["num_decode_seqs"], get["num_batched_tokens"]
        tokens = np.where(graph > 0, graph, batched).astype(np.int64)
        if len(tokens) and tokens.max() >= self._size:
            self._grow(int(tokens.max()))
        rows = (prefill + decode).astype(np.int64)
        single, eager = batched == rows, graph <= 0
        head_rows = np.where(~eager & single, tokens, rows)
        gpu = self._token_np[tokens] + (self._head_np[head_rows] + self._sampler_np[rows])
        gpu = gpu + self._attention_columns(get, single, eager)
        host = self._host_columns(get)
        replay = np.where(single, self._replay_decode, self._replay_mixed)
        launches = np.where(single, self._launch_single, np.where(decode > 0, self._launch_mixed, self._launch_prefill))
        if self.async_scheduling:
            return np.where(eager, np.maximum(host + launches, gpu), np.maximum(host, gpu + replay))
        return host + np.where(eager, np.maximum(launches, gpu), gpu + replay)

    def _host_columns(self, get: dict) -> np.ndarray:
        prefill, decode, eager = get["num_prefill_seqs"], get["num_decode_seqs"], get["cuda_graph_batch_size"] <= 0
        terms = self._host_terms
        return (terms["step"] + terms["prefill_seq"] * prefill + terms["decode_seq"] * decode
                + terms["prefill_token"] * get["num_prefill_tokens"]
                + terms["mixed_step"] * ((prefill > 0) & (decode > 0)) + terms["eager_step"] * eager)

    def _attention_columns(self, get: dict, single: np.ndarray, eager: np.ndarray) -> np.ndarray:
        prefill, decode = get["num_prefill_seqs"], get["num_decode_seqs"]
        decode_grids, prefill_grids = self.operators.decode_attention, self.operators.prefill_attention
        seconds = np.zeros(len(prefill))
        rows = prefill + decode
        with np.errstate(divide="ignore", invalid="ignore"):
            context = (get["decode_context_tokens"] + get["prefill_context_tokens"] + prefill) / rows
            seconds += np.where(single & ~eager, decode_grids["decode_graph"].at(rows, context), 0.0)
            seconds += np.where(single & eager, decode_grids["eager"].at(rows, context), 0.0)
            mean_context = get["decode_context_tokens"] / decode
            split = ~single & (decode > 0)
            seconds += np.where(split & eager, decode_grids["eager"].at(decode, mean_context), 0.0)
            seconds += np.where(split & ~eager, decode_grids["mixed_graph"].at(decode, mean_context), 0.0)
            query, prefill_context = get["num_prefill_tokens"] / prefill, get["prefill_context_tokens"] / prefill
            mean_work = prefill * query * (prefill_context + (query + 1) / 2)
            work = get["prefill_attention_work"]
            for kind, selected in (("eager", eager), ("mixed_graph", ~eager)):
                attention = prefill_grids[kind].at(prefill, query, prefill_context)
                attention = np.where((mean_work > 0) & (work > 0), attention * (work / mean_work), attention)
                seconds += np.where(~single & (prefill > 0) & selected, attention, 0.0)
        return seconds

    def step_breakdown(self, features: BatchFeatures, cuda_graph_batch_size: int = 0) -> dict[str, float]:
        """Seconds of each part of one step, to find which operator a prediction's error comes from: the
        per-token operators, head, sampler and attention run on the GPU; host; graph replay or eager launches.
        They add up as a synchronous step's (predict() without async_scheduling); an asynchronous step lasts the
        longer of host (with the launches, eagerly) and the rest."""
        graph = cuda_graph_batch_size
        tokens = graph or features.num_batched_tokens
        if tokens >= self._size:
            self._grow(tokens)
        rows = features.num_prefill_seqs + features.num_decode_seqs
        single = features.num_batched_tokens == rows
        parts = {name: float(seconds[0]) for name, seconds in self._token_parts(np.array([float(tokens)])).items()}
        parts["lm_head"] = self._head[graph if graph and single else rows]
        parts["sampler"] = self._sampler[rows]
        parts["attention"] = self._attention(features, graph, single)
        parts["host"] = self._host(features.num_prefill_seqs, features.num_prefill_tokens, features.num_decode_seqs,
                                   not graph)
        if graph:
            parts["graph_replay"] = self._replay_decode if single else self._replay_mixed
        else:
            parts["launch (overlaps the GPU)"] = self._launches(single, features.num_decode_seqs)
        return parts

    # --- storage ------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The JSON-able form a simulated run keeps in its metadata: the shape and the profile rows it used."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "gpu": self.gpu,
            "model": asdict(self.shape),
            "tp": self.tp,
            "dtype": self.dtype,
            "sampler": self.sampler,
            "max_model_len": self.max_model_len,
            "async_scheduling": self.async_scheduling,
            "interconnect_bandwidth": self.interconnect_bandwidth,
            "all_reduce_source": self.all_reduce_source,
            "operator_profile": self.profile.subset(self.operators.used_rows).to_json(),
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "composed cost model") -> "ComposedCostModel":
        """Build from to_json()'s form; errors name the source and the field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a composed cost model (field 'format' should be {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: field 'version' is {data.get('version')!r}, this twinfer reads {FORMAT_VERSION}")
        for key in ("model", "tp", "dtype", "operator_profile"):
            if key not in data:
                raise ValueError(f"{source}: missing field {key!r}")
        try:
            return cls(ModelShape(**data["model"]), OperatorProfile.from_json(data["operator_profile"]), tp=data["tp"],
                       dtype=data["dtype"], interconnect_bandwidth=data.get("interconnect_bandwidth"),
                       sampler=data.get("sampler", "greedy"), max_model_len=data.get("max_model_len"),
                       async_scheduling=bool(data.get("async_scheduling", False)))
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{source}: {error}") from None

