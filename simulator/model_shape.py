"""A decoder-only transformer's dimensions, read from a Hugging Face config.json, and what they cost."""

import json
from dataclasses import dataclass
from pathlib import Path

from engine.model_config import hub_snapshot

PRESETS_DIR = Path(__file__).resolve().parent.parent / "engine" / "presets"

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "fp8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name such as 'bfloat16'."""
    key = dtype.removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The sizes that decide a dense decoder's memory traffic and FLOPs."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    """q/k/v projections carry biases (Qwen2 and Qwen2.5 always do)."""
    max_position_embeddings: int | None = None
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before the rotary embedding (Qwen3): a costlier rotary kernel."""

    def __post_init__(self) -> None:
        for field_name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model {self.name!r}: {field_name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name!r}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def layer_linear_params(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o projections and the gated MLP."""
        q_size = self.num_attention_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q_size + 2 * kv_size) + q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attention + mlp

    @property
    def linear_params(self) -> int:
        """Weights every token is multiplied by, over all layers (the LM head not included)."""
        return self.num_layers * self.layer_linear_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All parameters, embeddings counted once when tied (norms and biases included)."""
        q_size = self.num_attention_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        per_layer_small = 2 * self.hidden_size + (q_size + 2 * kv_size if self.attention_bias else 0)
        embeddings = self.lm_head_params * (1 if self.tie_word_embeddings else 2)
        return self.linear_params + self.num_layers * per_layer_small + embeddings + self.hidden_size

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        """Bytes of all weights in this dtype."""
        return self.num_params * dtype_bytes(dtype)

    def step_weight_read_bytes(self, dtype: str = "bfloat16") -> int:
        """Weights a forward pass reads: every matmul weight plus the LM head (embedding rows are gathered)."""
        return (self.linear_params + self.lm_head_params) * dtype_bytes(dtype)

    @property
    def linear_flops_per_token(self) -> int:
        """Multiply-add FLOPs of the layers' matmuls for one token."""
        return 2 * self.linear_params

    @property
    def lm_head_flops_per_token(self) -> int:
        """FLOPs of the LM head for one sampled row."""
        return 2 * self.lm_head_params

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one query-key pair over all layers and heads: QK^T and PV, 2 FLOPs per element each."""
        return 4 * self.num_layers * self.num_attention_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """KV-cache bytes one token occupies over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes(dtype)

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "ModelShape":
        """Build from a config.json dict (Qwen2/Qwen3/Llama field names)."""
        if "num_experts" in config or "num_local_experts" in config:
            raise ValueError(f"model {name!r}: mixture-of-experts configs are not supported by the cost model")
        missing = [
            key
            for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
            if key not in config
        ]
        if missing:
            raise ValueError(f"model {name!r}: config.json lacks {', '.join(missing)}")
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        architectures = config.get("architectures") or []
        family = config.get("model_type", "")
        # As the engine's models: Qwen2 has q/k/v biases whatever attention_bias says, Qwen3 has q/k norms.
        qwen2 = family == "qwen2" or "Qwen2ForCausalLM" in architectures
        qwen3 = family == "qwen3" or "Qwen3ForCausalLM" in architectures
        return cls(
            name=name,
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            num_attention_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=qwen2 or bool(config.get("attention_bias", False)),
            max_position_embeddings=config.get("max_position_embeddings"),
            qk_norm=qwen3,
        )

    @classmethod
    def load(cls, model: str | Path) -> "ModelShape":
        """From a preset name (engine/presets/NAME.json), a config.json path, or a model folder holding one."""
        path = Path(model)
        snapshot = None
        if path.is_dir():
            path = path / "config.json"
        elif not path.is_file():
            snapshot = hub_snapshot(str(model))
            path = snapshot / "config.json" if snapshot is not None else PRESETS_DIR / f"{model}.json"
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
            raise FileNotFoundError(
                f"model {str(model)!r} is neither a preset ({', '.join(known) or 'none found'}) "
                f"nor a config.json file or a folder holding one"
            )
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno}: not valid JSON: {error.msg}") from None
        name = path.stem if path.parent == PRESETS_DIR else (path.parent.name if path.name == "config.json" else path.stem)
        if snapshot is not None:
            name = str(model).split("/")[-1]  # the snapshot's folder is named by its commit
        return cls.from_config(config, name=name)
