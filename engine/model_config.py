"""A model's shape, read from a Hugging Face config.json (a local folder, a Hub id in the local cache, or a
bundled preset), and where a model name's files are."""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PRESETS_DIR = Path(__file__).parent / "presets"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
_ARCHITECTURE_BY_MODEL_TYPE = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def preset_names() -> list[str]:
    """Names of the bundled model configs (qwen3-0.6b, llama-3-8b, ...)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding settings; rope_type is "default" or "llama3"."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (supported: default, llama3)")
        if self.theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.theta}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The fields of config.json the model runner needs, validated."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool
    """config.json's attention_bias (Llama, Qwen3); Qwen2 has q/k/v biases regardless."""
    torch_dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    source: str = ""
    """Where the config came from (a folder path or "preset:NAME"), for error messages."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.source}: config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def num_params(self) -> int:
        """Parameter count (embedding and head counted once when tied)."""
        attn = self.hidden_size * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
        """Bytes of K and V one token occupies over all layers on one rank."""
        kv_heads = max(1, self.num_key_value_heads // tensor_parallel_size)
        return 2 * self.num_hidden_layers * kv_heads * self.head_dim * dtype_bytes


def _rope_from(raw: dict, source: str) -> RopeConfig:
    # transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_theta and rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    try:
        return RopeConfig(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def model_config_from_dict(raw: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a parsed config.json, naming the file in any error."""
    architectures = raw.get("architectures") or []
    if not architectures and raw.get("model_type") in _ARCHITECTURE_BY_MODEL_TYPE:
        architectures = [_ARCHITECTURE_BY_MODEL_TYPE[raw["model_type"]]]
    supported = [arch for arch in architectures if arch in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ValueError(
            f"{source}: architecture {architectures or raw.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    architecture = supported[0]
    missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if key not in raw]
    if missing:
        raise ValueError(f"{source}: missing config field(s) {', '.join(missing)}")
    num_heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig(
        architecture=architecture,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=_rope_from(raw, source),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        eos_token_ids=eos_ids,
        source=source,
    )


def hub_cache_dir() -> Path:
    """The local Hugging Face Hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (read now,
    so a changed environment counts)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def is_hub_id(model: str) -> bool:
    """Whether model is shaped like a Hub repository id (owner/name) rather than a path."""
    return _HUB_ID.fullmatch(model) is not None and not Path(model).exists()


def hub_snapshot(model: str) -> Path | None:
    """The folder of the Hub model's snapshot in the local cache (its main revision), or None when not cached.
    Never downloads."""
    if not is_hub_id(model):
        return None
    cache = hub_cache_dir()
    if not (cache / f"models--{model.replace('/', '--')}").is_dir():
        return None  # not cached: huggingface_hub need not even be imported
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def model_folder(model: str) -> Path | None:
    """The folder holding the model's files (a local folder or a cached Hub snapshot); None for a preset."""
    path = Path(model)
    if path.is_dir():
        return path
    if (PRESETS_DIR / f"{model.lower()}.json").is_file():
        return None
    return hub_snapshot(model)


def resolve_model_path(model: str) -> Path:
    """The config.json for a model folder, a Hub id in the local cache or a bundled preset name, or a clear error."""
    path = Path(model)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"model folder {model!r} has no config.json")
        return config
    preset = PRESETS_DIR / f"{model.lower()}.json"
    if preset.is_file():
        return preset
    snapshot = hub_snapshot(model)
    if snapshot is not None:
        config = snapshot / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"the cached snapshot of {model!r} ({snapshot}) has no config.json; download it "
                                    f"again: hf download {model}")
        return config
    if is_hub_id(model):
        raise FileNotFoundError(
            f"model {model!r} is not in the local Hugging Face cache ({hub_cache_dir()}, set by HF_HUB_CACHE or "
            f"HF_HOME), nor a local folder or a bundled preset ({', '.join(preset_names())}); download it first "
            f"with `hf download {model}` (huggingface_hub's CLI), or give the model folder's path"
        )
    raise FileNotFoundError(
        f"model {model!r} is neither a local folder with config.json nor a bundled preset "
        f"(presets: {', '.join(preset_names())}), nor a Hub id (owner/name) in the local Hugging Face cache"
    )


def load_model_config(model: str) -> ModelConfig:
    """Read the ModelConfig of a model folder or bundled preset."""
    config_path = resolve_model_path(model)
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    return model_config_from_dict(raw, source=str(config_path))


def is_preset(model: str) -> bool:
    """True when model names a bundled preset rather than a folder."""
    return not Path(model).is_dir() and (PRESETS_DIR / f"{model.lower()}.json").is_file()
