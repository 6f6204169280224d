"""Model weights: from safetensors files, or dummy random weights of the checkpoint's exact names and shapes.

Both paths yield (checkpoint name, full tensor) pairs through the same loading code, so each rank of a
tensor-parallel group takes its slice of the same full tensors: dummy weights agree across TP degrees.
"""

import zlib
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from engine.model_config import ModelConfig

LOAD_FORMATS = ("auto", "safetensors", "dummy")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def checkpoint_shapes(config: ModelConfig, qkv_bias: bool, qk_norm: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Hugging Face checkpoint of this model, in file order."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        for proj, size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            shapes[prefix + f"self_attn.{proj}.weight"] = (size, hidden)
            if qkv_bias:
                shapes[prefix + f"self_attn.{proj}.bias"] = (size,)
        if qk_norm:
            shapes[prefix + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[prefix + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, q_size)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        shapes[prefix + "mlp.gate_proj.weight"] = (config.intermediate_size, hidden)
        shapes[prefix + "mlp.up_proj.weight"] = (config.intermediate_size, hidden)
        shapes[prefix + "mlp.down_proj.weight"] = (hidden, config.intermediate_size)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def dummy_tensors(
    shapes: dict[str, tuple[int, ...]], seed: int, device: torch.device | str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights: each tensor seeded by its name, so any rank or run makes the same ones."""
    for name, shape in shapes.items():
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if name.endswith("norm.weight"):
            # Norm gains near 1, as in trained models, so activations stay in a realistic range.
            tensor = 1.0 + 0.05 * tensor
        else:
            tensor = 0.02 * tensor
        yield name, tensor.to(dtype)


def safetensors_files(folder: Path) -> list[Path]:
    """The *.safetensors files of a model folder, or a clear error when there are none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"model folder {str(folder)!r} has no *.safetensors files (only safetensors weights are supported; "
            "use load_format='dummy' for random weights)"
        )
    return files


def safetensors_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the folder's safetensors files, read one at a time."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy checkpoint tensors into the model's (possibly packed, possibly sharded) parameters."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        for checkpoint_part, (packed_part, shard_id) in packed.items():
            if f".{checkpoint_part}." in name:
                target = name.replace(f".{checkpoint_part}.", f".{packed_part}.")
                param = params.get(target)
                if param is None:
                    raise ValueError(f"{source}: checkpoint tensor {name!r} has no matching parameter {target!r}")
                with torch.no_grad():
                    param.weight_loader(param, tensor.to(param.device), shard_id)
                loaded.add(f"{target}#{shard_id}")
                break
        else:
            param = params.get(name)
            if param is None:
                raise ValueError(f"{source}: checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
            with torch.no_grad():
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    if param.shape != tensor.shape:
                        raise ValueError(f"{source}: {name!r} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(param.shape)}")
                    param.copy_(tensor)
                else:
                    loader(param, tensor.to(param.device))
            loaded.add(name)
    expected = set()
    for name in params:
        parts = [(c, p, s) for c, (p, s) in packed.items() if f".{p}." in name]
        if parts:
            expected.update(f"{name}#{shard}" for _, _, shard in parts)
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} weight(s): {shown}")


def save_dummy_checkpoint(
    config: ModelConfig, folder: str | Path, *, qkv_bias: bool, qk_norm: bool, seed: int = 0,
    dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
) -> Path:
    """Write the dummy weights of this model as model.safetensors in folder (for checks against transformers)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.cpu().contiguous() for name, t in
               dummy_tensors(checkpoint_shapes(config, qkv_bias, qk_norm), seed, device, dtype)}
    path = folder / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
