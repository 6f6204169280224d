"""The calibrated step-time model: physically meaningful terms with fitted non-negative weights.

A step's time is host + GPU work, where
    host = step + prefill_seq * prefill sequences + decode_seq * decode sequences
           + prefill_token * prefill tokens                      (input preparation, sampling, bookkeeping)
           + mixed_step on a step with both prefill and decode rows (its attention runs two kernels)
           + serving_eager_step on an eager step of a serving run: the host time a profile, which times
             each batch shape on its own, does not see (fitted from real runs' steps when calibration
             has some; every simulated step is a serving step)
    gpu  = token * T + sum_k token_over_k * max(0, T - k)                   (matmuls, T = padded tokens)
           + prefill_attention_pair * query-key pairs + prefill_context_token * cached tokens prefill reads
           + decode_context_token * context read by decode (pure-decode steps)
             or mixed_decode_context_token * that context (steps with a prefill too)
A CUDA-graph step takes host + gpu. An eager step must also launch every kernel (eager_step seconds):
with eager_overlap the launches overlap the GPU work, host + max(eager_step, gpu), which is what small
models show; without it they add, host + eager_step + gpu. Calibration picks whichever fits better.
T is the CUDA-graph batch size when a graph ran (padded rows cost like real ones), else the batch's tokens.
The convex piecewise-linear matmul term is flat while weights reads dominate and climbs once FLOPs do.
It predicts a step as a real run records it: from the step's start to the next step's start, so the
engine's scheduling and bookkeeping are included (calibration adds them to profiled executor times).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.stats import BatchFeatures

FORMAT = "twinfer-cost-model"
FORMAT_VERSION = 1

HOST_TERMS = ("step", "prefill_seq", "decode_seq", "prefill_token", "mixed_step", "serving_eager_step")
LAUNCH_TERM = "eager_step"
GPU_TERMS = (
    "token",
    "prefill_attention_pair",
    "prefill_context_token",
    "decode_context_token",
    "mixed_decode_context_token",
)

DEFAULT_KNOTS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)

FEATURE_COLUMNS = (
    "num_prefill_seqs",
    "num_prefill_tokens",
    "num_decode_seqs",
    "decode_context_tokens",
    "prefill_context_tokens",
    "prefill_attention_work",
    "num_batched_tokens",
    "cuda_graph_batch_size",
)


def term_names(knots) -> list[str]:
    """Names of the model's terms, in design-matrix order (host, launch, GPU), for these hinge knots."""
    return [*HOST_TERMS, LAUNCH_TERM, *GPU_TERMS] + [f"token_over_{knot}" for knot in knots]


def term_blocks(columns: dict, knots) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step: host-term columns, whether it ran eagerly, and GPU-term columns (hinges last)."""
    get = {name: np.asarray(columns[name], dtype=np.float64) for name in FEATURE_COLUMNS}
    graph = get["cuda_graph_batch_size"]
    tokens = np.where(graph > 0, graph, get["num_batched_tokens"])
    has_prefill = get["num_prefill_seqs"] > 0
    decode_context = get["decode_context_tokens"]
    mixed = (has_prefill & (get["num_decode_seqs"] > 0)).astype(np.float64)
    eager = graph <= 0
    # Rows of a profile carry serving 0; steps of real runs, and every step simulated, are serving steps.
    serving = np.asarray(columns["serving"], dtype=np.float64) if "serving" in columns else 1.0
    host = np.column_stack(
        [np.ones_like(tokens), get["num_prefill_seqs"], get["num_decode_seqs"], get["num_prefill_tokens"], mixed,
         eager * serving]
    )
    gpu = np.column_stack(
        [
            tokens,
            get["prefill_attention_work"],
            get["prefill_context_tokens"],
            np.where(has_prefill, 0.0, decode_context),
            np.where(has_prefill, decode_context, 0.0),
        ]
        + [np.maximum(tokens - knot, 0.0) for knot in knots]
    )
    return host, eager, gpu


def design_matrix(columns: dict, knots, launch_bound: np.ndarray | None = None) -> np.ndarray:
    """One row per step, one column per term (term_names order).

    launch_bound None: the additive model. Otherwise the overlap model's linear piece for each step:
    a launch-bound eager step is host + eager_step, any other step host + gpu.
    """
    host, eager, gpu = term_blocks(columns, knots)
    if launch_bound is None:
        return np.column_stack([host, eager.astype(np.float64), gpu])
    launch_bound = np.asarray(launch_bound, dtype=bool) & eager
    return np.column_stack([host, launch_bound.astype(np.float64), gpu * ~launch_bound[:, None]])


@dataclass(frozen=True)
class CostModel:
    """Fitted seconds per term for one (GPU, model, TP, dtype); predict() is plain float arithmetic."""

    gpu: str
    model: str
    tp: int
    dtype: str
    coefficients: dict[str, float]
    knots: tuple[int, ...] = DEFAULT_KNOTS
    eager_overlap: bool = False
    """Eager steps take host + max(eager_step, gpu) rather than host + eager_step + gpu."""
    fit_report: dict = field(default_factory=dict)
    """How the fit went: data source, rows, held-out MAPE (kept in the JSON for anyone who loads it)."""

    calibrated = True
    provenance = "calibrated"

    def __post_init__(self) -> None:
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"cost model tp must be a positive integer, got {self.tp!r}")
        object.__setattr__(self, "knots", tuple(int(k) for k in self.knots))
        if not isinstance(self.eager_overlap, bool):
            raise ValueError(f"cost model eager_overlap must be true or false, got {self.eager_overlap!r}")
        if list(self.knots) != sorted(set(self.knots)):
            raise ValueError(f"cost model knots must be strictly increasing, got {self.knots}")
        expected = term_names(self.knots)
        unknown = sorted(set(self.coefficients) - set(expected))
        if unknown:
            raise ValueError(f"cost model has unknown terms {unknown}; known: {expected}")
        for name, value in self.coefficients.items():
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"cost model term {name!r} must be a non-negative number, got {value!r}")
        coefficient = {name: float(self.coefficients.get(name, 0.0)) for name in expected}
        object.__setattr__(self, "coefficients", coefficient)
        # Flattened for predict(): attribute lookups on a dict per call would cost more than the arithmetic.
        self._set("_step", coefficient["step"])
        self._set("_eager", coefficient["eager_step"])
        self._set("_prefill_seq", coefficient["prefill_seq"])
        self._set("_decode_seq", coefficient["decode_seq"])
        self._set("_prefill_token", coefficient["prefill_token"])
        self._set("_mixed_step", coefficient["mixed_step"])
        self._set("_serving_eager", coefficient["serving_eager_step"])
        self._set("_token", coefficient["token"])
        self._set("_pair", coefficient["prefill_attention_pair"])
        self._set("_prefill_context", coefficient["prefill_context_token"])
        self._set("_decode_context", coefficient["decode_context_token"])
        self._set("_mixed_decode_context", coefficient["mixed_decode_context_token"])
        # Zero-weight hinges are skipped: adding 0.0 would not change a single bit of the sum.
        self._set(
            "_hinges",
            tuple((knot, coefficient[f"token_over_{knot}"]) for knot in self.knots if coefficient[f"token_over_{knot}"]),
        )

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    @property
    def label(self) -> str:
        return f"calibrated {self.gpu} {self.model} tp{self.tp} {self.dtype}"

    def _host(self, num_prefill_seqs, num_prefill_tokens, num_decode_seqs) -> float:
        host = (
            self._step
            + self._prefill_seq * num_prefill_seqs
            + self._decode_seq * num_decode_seqs
            + self._prefill_token * num_prefill_tokens
        )
        if num_prefill_seqs and num_decode_seqs:
            host += self._mixed_step
        return host

    def _gpu(self, tokens, attention_work, prefill_context) -> float:
        seconds = self._token * tokens
        for knot, slope in self._hinges:
            if tokens <= knot:
                break
            seconds += slope * (tokens - knot)
        return seconds + self._pair * attention_work + self._prefill_context * prefill_context

    def predict(self, features: BatchFeatures, cuda_graph_batch_size: int = 0) -> float:
        """Predicted seconds of one step with this batch (cuda_graph_batch_size 0: ran eagerly)."""
        host = self._host(features.num_prefill_seqs, features.num_prefill_tokens, features.num_decode_seqs)
        gpu = self._gpu(
            cuda_graph_batch_size or features.num_batched_tokens,
            features.prefill_attention_work,
            features.prefill_context_tokens,
        )
        if features.num_prefill_seqs:
            gpu = gpu + self._mixed_decode_context * features.decode_context_tokens
        else:
            gpu = gpu + self._decode_context * features.decode_context_tokens
        if cuda_graph_batch_size:
            return host + gpu
        host = host + self._serving_eager
        if self.eager_overlap:
            return host + max(self._eager, gpu)
        return host + (self._eager + gpu)

    def predict_decode_run(
        self, num_decode_seqs: int, decode_context_tokens: int, num_steps: int, cuda_graph_batch_size: int = 0
    ) -> list[float]:
        """Durations of num_steps pure-decode steps whose context grows by num_decode_seqs a step.

        The same operations in the same order as predict(), step-invariant parts hoisted, so every
        duration is bit for bit what predict() returns for that step.
        """
        host = self._host(0, 0, num_decode_seqs)
        gpu = self._gpu(cuda_graph_batch_size or num_decode_seqs, 0.0, 0)
        per_context = self._decode_context
        contexts = (range(decode_context_tokens, decode_context_tokens + num_steps * num_decode_seqs, num_decode_seqs)
                    if num_decode_seqs else [decode_context_tokens] * num_steps)
        # One pass per case, each step's gpu part computed inside: the same additions as predict(), in its order.
        if cuda_graph_batch_size:
            return [host + (gpu + per_context * context) for context in contexts]
        host = host + self._serving_eager
        launch = self._eager
        if self.eager_overlap:
            return [host + max(launch, gpu + per_context * context) for context in contexts]
        return [host + (launch + (gpu + per_context * context)) for context in contexts]

    def predict_columns(self, columns: dict) -> np.ndarray:
        """Vectorized predictions for step columns (as in steps.parquet); equal to predict() up to rounding."""
        coefficients = np.array([self.coefficients[name] for name in term_names(self.knots)])
        num_host = len(HOST_TERMS)
        host, eager, gpu = term_blocks(columns, self.knots)
        host_seconds = host @ coefficients[:num_host]
        gpu_seconds = gpu @ coefficients[num_host + 1 :]
        launch = coefficients[num_host]
        eager_gpu = np.maximum(launch, gpu_seconds) if self.eager_overlap else launch + gpu_seconds
        return host_seconds + np.where(eager, eager_gpu, gpu_seconds)

    def to_json(self) -> dict:
        """The JSON-able form saved in profiles/."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "gpu": self.gpu,
            "model": self.model,
            "tp": self.tp,
            "dtype": self.dtype,
            "knots": list(self.knots),
            "eager_overlap": self.eager_overlap,
            "coefficients": self.coefficients,
            "fit": self.fit_report,
        }

    def save(self, path: str | Path) -> None:
        """Write as a small JSON file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        temporary.replace(path)

    @classmethod
    def from_json(cls, data: dict, source: str = "cost model") -> "CostModel":
        """Build from to_json()'s form; errors name the source and the field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a twinfer cost model (field 'format' should be {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: field 'version' is {data.get('version')!r}, this twinfer reads {FORMAT_VERSION}")
        for key in ("gpu", "model", "tp", "dtype", "knots", "coefficients"):
            if key not in data:
                raise ValueError(f"{source}: missing field {key!r}")
        try:
            return cls(
                gpu=data["gpu"],
                model=data["model"],
                tp=data["tp"],
                dtype=data["dtype"],
                coefficients=data["coefficients"],
                knots=tuple(data["knots"]),
                eager_overlap=data.get("eager_overlap", False),
                fit_report=data.get("fit", {}),
            )
        except (ValueError, TypeError) as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """Read a JSON file written by save()."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno}: not valid JSON: {error.msg}") from None
        return cls.from_json(data, source=str(path))
