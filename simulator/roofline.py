"""An analytic, uncalibrated step-time estimate for any GPU spec and model shape.

GPU time per step, per tensor-parallel rank:
  matmuls     max(weights read once / bandwidth, matmul FLOPs / FLOP rate)
  attention   KV read by decode and by prefill over cached context, KV written, at the bandwidth,
              plus prefill query-key pairs at a (lower) attention FLOP rate
  all-reduce  two per layer over the interconnect when TP > 1 (ring: 2 (tp-1)/tp of the bytes, plus latency)
Host time: a fixed cost per step and per sequence (input preparation, sampling); an eager step also has to
launch every kernel, which hides behind GPU work only when the GPU is the slower of the two.
"""

from dataclasses import asdict, dataclass

from engine.stats import BatchFeatures
from simulator.gpu_specs import GpuSpec
from simulator.model_shape import ModelShape, dtype_bytes

FORMAT = "twinfer-roofline"
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class HostOverheads:
    """CPU costs the roofline adds, for twinfer's own Python engine and executor.

    step_s and per_seq_s are what twinfer's executor spent on an H100 host (Qwen3-0.6B decode steps,
    2026-11 profile: ~1.2 ms a step and ~15-20 us a sequence beyond the GPU work); a faster executor
    makes them smaller.
    """

    step_s: float = 1.2e-3
    per_seq_s: float = 15e-6
    launch_per_layer_s: float = 70e-6
    """Eager only: ~14 kernel launches per layer at ~5 us each."""
    allreduce_latency_s: float = 10e-6
    attention_flops_efficiency: float = 0.5
    """Attention kernels reach about half the matmul rate."""


@dataclass(frozen=True)
class Roofline:
    """Predicts step time from datasheet figures; labelled uncalibrated wherever it is used."""

    gpu: GpuSpec
    shape: ModelShape
    tp: int = 1
    dtype: str = "bfloat16"
    host: HostOverheads = HostOverheads()

    calibrated = False
    provenance = "roofline"

    def __post_init__(self) -> None:
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"roofline tp must be a positive integer, got {self.tp!r}")
        if self.shape.num_kv_heads % self.tp and self.tp % self.shape.num_kv_heads:
            raise ValueError(
                f"tp={self.tp} does not divide model {self.shape.name!r}'s {self.shape.num_kv_heads} KV heads"
            )
        element = dtype_bytes(self.dtype)
        bandwidth = self.gpu.effective_memory_bandwidth
        flops = self.gpu.effective_bf16_flops * (2 if element == 1 else 1)
        tp = self.tp
        # Per-rank seconds per unit of each feature, folded once so predict() is a handful of multiplies.
        self._set("_weights_s", self.shape.step_weight_read_bytes(self.dtype) / tp / bandwidth)
        self._set("_linear_flop_s_per_token", self.shape.linear_flops_per_token / tp / flops)
        self._set("_lm_head_s_per_row", self.shape.lm_head_flops_per_token / tp / flops)
        kv_heads_per_rank = max(1, self.shape.num_kv_heads // tp)
        kv_bytes = 2 * self.shape.num_layers * kv_heads_per_rank * self.shape.head_dim * element
        self._set("_kv_s_per_token", kv_bytes / bandwidth)
        self._set(
            "_pair_s",
            self.shape.attention_flops_per_pair / tp / (self.gpu.effective_bf16_flops * self.host.attention_flops_efficiency),
        )
        if tp > 1:
            ring_bytes_per_token = 2 * (tp - 1) / tp * self.shape.hidden_size * element
            self._set("_allreduce_fixed_s", 2 * self.shape.num_layers * self.host.allreduce_latency_s)
            self._set(
                "_allreduce_s_per_token",
                2 * self.shape.num_layers * ring_bytes_per_token / self.gpu.interconnect_bandwidth,
            )
        else:
            self._set("_allreduce_fixed_s", 0.0)
            self._set("_allreduce_s_per_token", 0.0)
        self._set("_launch_s", self.shape.num_layers * self.host.launch_per_layer_s)

    def _set(self, name: str, value: float) -> None:
        object.__setattr__(self, name, value)

    @property
    def label(self) -> str:
        return f"uncalibrated roofline {self.gpu.name} {self.shape.name} tp{self.tp} {self.dtype}"

    def _predict_values(
        self,
        num_prefill_seqs: int,
        num_decode_seqs: int,
        num_batched_tokens: int,
        graph_size: int,
        decode_context: int,
        prefill_context: int,
        attention_work: float,
    ) -> float:
        tokens = graph_size or num_batched_tokens
        num_seqs = num_prefill_seqs + num_decode_seqs
        matmul = max(self._weights_s, self._linear_flop_s_per_token * tokens + self._lm_head_s_per_row * num_seqs)
        kv_traffic = self._kv_s_per_token * (decode_context + prefill_context + num_batched_tokens)
        gpu = matmul + kv_traffic + self._pair_s * attention_work
        if self.tp > 1:
            gpu += self._allreduce_fixed_s + self._allreduce_s_per_token * tokens
        host = self.host.step_s + self.host.per_seq_s * num_seqs
        if graph_size:
            return host + gpu
        return host + max(gpu, self._launch_s)

    def predict(self, features: BatchFeatures, cuda_graph_batch_size: int = 0) -> float:
        """Predicted seconds of one step (uncalibrated)."""
        return self._predict_values(
            features.num_prefill_seqs,
            features.num_decode_seqs,
            features.num_batched_tokens,
            cuda_graph_batch_size,
            features.decode_context_tokens,
            features.prefill_context_tokens,
            features.prefill_attention_work,
        )

    def predict_decode_run(
        self, num_decode_seqs: int, decode_context_tokens: int, num_steps: int, cuda_graph_batch_size: int = 0
    ) -> list[float]:
        """Durations of num_steps pure-decode steps whose context grows by num_decode_seqs a step.

        The same operations in the same order as _predict_values, with the step-invariant parts hoisted,
        so every duration is bit for bit what predict() gives.
        """
        tokens = cuda_graph_batch_size or num_decode_seqs
        matmul = max(self._weights_s, self._linear_flop_s_per_token * tokens + self._lm_head_s_per_row * num_decode_seqs)
        kv_s = self._kv_s_per_token
        pair_term = self._pair_s * 0.0
        host = self.host.step_s + self.host.per_seq_s * num_decode_seqs
        first = decode_context_tokens + num_decode_seqs
        # KV read per step: context plus batched tokens, as _predict_values adds them (whole numbers, exact).
        contexts = (range(first, first + num_steps * num_decode_seqs, num_decode_seqs) if num_decode_seqs
                    else [first] * num_steps)
        # One pass per case, each step's gpu part computed inside: _predict_values' additions, in its order.
        launch = self._launch_s
        if self.tp > 1:
            reduce = self._allreduce_fixed_s + self._allreduce_s_per_token * tokens
            if cuda_graph_batch_size:
                return [host + (matmul + kv_s * context + pair_term + reduce) for context in contexts]
            return [host + max(matmul + kv_s * context + pair_term + reduce, launch) for context in contexts]
        if cuda_graph_batch_size:
            return [host + (matmul + kv_s * context + pair_term) for context in contexts]
        return [host + max(matmul + kv_s * context + pair_term, launch) for context in contexts]

    def to_json(self) -> dict:
        """The JSON-able form a simulated run keeps in its metadata (every figure it was computed from)."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "gpu": asdict(self.gpu), "model": asdict(self.shape),
                "tp": self.tp, "dtype": self.dtype, "host": asdict(self.host)}

    @classmethod
    def from_json(cls, data: dict, source: str = "roofline") -> "Roofline":
        """Build from to_json()'s form; errors name the source."""
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: not a twinfer roofline of version {FORMAT_VERSION}")
        try:
            return cls(GpuSpec(**data["gpu"]), ModelShape(**data["model"]), tp=data["tp"], dtype=data["dtype"],
                       host=HostOverheads(**data.get("host", {})))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None
