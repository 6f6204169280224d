"""The shapes an operator profile covers: the supported models' dimensions at every TP, and each table's grid
(the full one for a GPU, a tiny one for a check on the CPU)."""

import random
from dataclasses import dataclass
from pathlib import Path

BLOCK_SIZE = 16
"""The engine's default KV block size, the one the attention tables use."""


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The sizes of a model that decide the shapes of its operators."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool
    """Qwen3's per-head q/k norms inside the rotary kernel."""

    def tp_degrees(self, candidates) -> list[int]:
        """The TP degrees the engine can split this model at (heads, KV heads and the MLP divide)."""
        return [tp for tp in candidates
                if self.heads % tp == 0 and self.kv_heads % tp == 0 and self.intermediate % tp == 0]

    def linear_shapes(self, tp: int) -> dict[str, tuple[int, int]]:
        """(n, k) per rank of each linear layer: F.linear(x[m, k], w[n, k])."""
        heads, kv_heads, head_dim = self.heads // tp, self.kv_heads // tp, self.head_dim
        return {
            "qkv": ((heads + 2 * kv_heads) * head_dim, self.hidden),
            "o": (self.hidden, heads * head_dim),
            "gate_up": (2 * self.intermediate // tp, self.hidden),
            "down": (self.hidden, self.intermediate // tp),
            "lm_head": (-(-self.vocab // tp), self.hidden),
        }


VALIDATED_MODELS = ("qwen3-0.6b", "qwen3-8b", "qwen3-32b", "llama-3-8b")
"""The models issue 15 validates the composed twin on: their shapes come first, and none is the host-step probe."""


def dims_of(name: str) -> ModelDims:
    """A preset's (or model folder's) dimensions, as the engine reads its config.json."""
    from engine.model_config import load_model_config
    from engine.models import attention_features

    config = load_model_config(name)
    _, qk_norm = attention_features(config.architecture, config.attention_bias)
    return ModelDims(Path(name).name, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim, config.vocab_size, qk_norm)


def supported_models() -> tuple[ModelDims, ...]:
    """Every bundled preset, the validated ones first (the tiny test model left out)."""
    from engine.model_config import preset_names

    names = [name for name in preset_names() if name != "tiny-qwen3"]
    names.sort(key=lambda name: (name not in VALIDATED_MODELS, name))
    return tuple(dims_of(name) for name in names)




@dataclass(frozen=True)
class OperatorGrid:
    """The shapes each table covers: FULL_GRID on a GPU; quick_grid() for a check that every operator runs."""

    models: tuple[ModelDims, ...] = ()
    """Empty: supported_models()."""
    tp_candidates: tuple[int, ...] = (1, 2, 4, 8)
    gemm_m: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768,
                               1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
    lm_head_max_m: int = 2048
    """The LM head runs on sampled rows only: at most max_num_seqs (1024 on an H200)."""
    general_sizes: tuple[int, ...] = (512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768,
                                      49152, 65536)
    general_m: tuple[int, ...] = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    general_max_weight: int = 1 << 30
    """Elements of the largest general weight (n * k): about the largest LM head's."""
    # Fine where serving batches live: a coarser grid (1, 8, 32, 128 sequences; 1,024 and 4,096 tokens) put the
    # kernel 5% under its own time at 40-64 sequences of 1,300 tokens (H200, session 11's decode_gap.py).
    decode_seqs: tuple[int, ...] = (1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
    decode_contexts: tuple[int, ...] = (128, 512, 1024, 2048, 4096, 8192, 32768)
    decode_max_tokens: int = 1 << 21
    decode_table_tokens: int = 32768
    """Block tables as wide as decode CUDA graphs make them at the default max_model_len (32768)."""
    extra_attention_layouts: tuple[tuple[int, int, int], ...] = ((14, 2, 64), (32, 8, 64))
    """Head layouts no preset has, timed after the presets': head_dim 64 (Qwen2.5-0.5B, Llama-3.2-1B at TP 1), which
    the attention kernels are compiled for apart."""
    prefill_seqs: tuple[int, ...] = (1, 16)
    prefill_query_lens: tuple[int, ...] = (16, 128, 512, 2048, 8192)
    prefill_contexts: tuple[int, ...] = (0, 2048, 16384)
    prefill_max_tokens: int = 8192
    mixed_graph_seqs: int = 1024
    """Sequence rows of the mixed-step CUDA graphs (max_num_seqs, vLLM's default on an H200)."""
    mixed_graph_tokens: int = 2048
    """Padded tokens of the mixed-step graph whose fixed layout the work_map and tile_map variants time."""
    elementwise_m: tuple[int, ...] = (1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
    sampler_rows: tuple[int, ...] = (1, 4, 16, 64, 128, 256, 512, 1024)
    replay_nodes: tuple[int, ...] = (1, 16, 128, 512, 2048)
    launch_counts: tuple[int, ...] = (1, 16, 128, 512)
    all_reduce_bytes: tuple[int, ...] = tuple(1 << power for power in range(10, 29, 2))
    probe: str = "qwen3-1.7b"
    """The host-step probe, a preset or model folder: never a model the composed twin is validated on."""
    probe_engine: dict | None = None
    """EngineConfig fields for the probe; None: vLLM's defaults for this GPU, as `twinfer replay` picks them."""
    serving_seconds: float = 30.0
    serving_rate: float = 24.0
    attention_backend: str = "auto"
    """The engine's choice: Triton on a GPU, torch on the CPU ("triton" on the CPU needs TRITON_INTERPRET=1)."""

    def __post_init__(self) -> None:
        if Path(self.probe).name in VALIDATED_MODELS:
            raise ValueError(f"the host-step probe {self.probe!r} is a validated model: its steps would leak into "
                             "the twin validated on it")


FULL_GRID = OperatorGrid()


def quick_grid() -> OperatorGrid:
    """Tiny shapes of the same structure, for a CPU run of seconds (the tiny test model is the probe)."""
    tiny = ModelDims("tiny-qwen3", 128, 384, 4, 2, 32, 4096, True)
    tiny_llama = ModelDims("tiny-llama", 256, 512, 8, 2, 32, 4096, False)
    return OperatorGrid(
        models=(tiny, tiny_llama), tp_candidates=(1, 2), gemm_m=(1, 16, 128, 512), lm_head_max_m=128,
        general_sizes=(256, 512), general_m=(1, 64, 512), general_max_weight=1 << 18, extra_attention_layouts=(),
        decode_seqs=(1, 3), decode_contexts=(40,), decode_max_tokens=1 << 10, decode_table_tokens=256,
        prefill_seqs=(1, 2), prefill_query_lens=(8, 33), prefill_contexts=(40,), prefill_max_tokens=64,
        mixed_graph_seqs=8, mixed_graph_tokens=64, elementwise_m=(1, 64), sampler_rows=(1, 8), replay_nodes=(1, 8),
        launch_counts=(1, 8), all_reduce_bytes=(1024, 65536), probe="tiny-qwen3",
        probe_engine={"max_model_len": 128, "max_num_seqs": 16, "max_num_batched_tokens": 64},
        serving_seconds=2.0, serving_rate=20.0,
    )


def preset_gemm_shapes(models, tp_candidates, lm_head_max_m: int) -> list[tuple[int, int, int]]:
    """(n, k, largest m) of every linear layer of every model at every TP, TP 1 of all models first, each (n, k)
    once."""
    largest: dict[tuple[int, int], int] = {}
    for tp in tp_candidates:
        for dims in models:
            if tp not in dims.tp_degrees(tp_candidates):
                continue
            for role, shape in dims.linear_shapes(tp).items():
                limit = lm_head_max_m if role == "lm_head" else 1 << 62
                largest[shape] = max(largest.get(shape, 0), limit)
    return [(n, k, limit) for (n, k), limit in largest.items()]


def general_gemm_shapes(grid: OperatorGrid, exclude) -> list[tuple[int, int, int]]:
    """(n, k, largest m) over the general sizes not already among `exclude`, in a seeded random order: a run cut
    short keeps an even sample of the grid."""
    excluded = {(n, k) for n, k, _ in exclude}
    shapes = [(n, k, 1 << 62) for n in grid.general_sizes for k in grid.general_sizes
              if n * k <= grid.general_max_weight and (n, k) not in excluded]
    random.Random(0).shuffle(shapes)
    return shapes


def attention_layouts(models, grid: "OperatorGrid", with_qk_norm: bool = False) -> list[tuple]:
    """(heads, KV heads, head_dim) per rank of every model at every TP, TP 1 first, then the grid's extra layouts,
    each once; with_qk_norm: also whether the model has Qwen3's q/k norms (a layout of both kinds of model then
    comes twice; the extra layouts have none)."""
    layouts: dict[tuple, None] = {}
    for tp in grid.tp_candidates:
        for dims in models:
            if tp in dims.tp_degrees(grid.tp_candidates):
                layout = (dims.heads // tp, dims.kv_heads // tp, dims.head_dim)
                layouts[layout + (dims.qk_norm,) if with_qk_norm else layout] = None
    for layout in grid.extra_attention_layouts:
        layouts[tuple(layout) + (False,) if with_qk_norm else tuple(layout)] = None
    return list(layouts)


def distinct(values) -> list:
    """The values in first-seen order, each once."""
    return list(dict.fromkeys(values))


def coarse_first(values) -> tuple[list, list]:
    """(every other value, both ends included; the rest): a first pass over the first leaves an even grid if cut."""
    values = list(values)
    coarse = values[::2] + ([values[-1]] if len(values) % 2 == 0 else [])
    return coarse, [value for value in values if value not in coarse]
