"""Write a random-weights model folder that nano-vLLM loads as it loads a Hugging Face download.

    python benchmarks/nanovllm_model_folder.py FOLDER [--model qwen3-0.6b]

nano-vLLM reads config.json through transformers' AutoConfig, every *.safetensors file of the folder, and a
tokenizer through AutoTokenizer (bench.py encodes one warm-up string and decodes every output). The GPU machine
has no Hugging Face download, so: config.json from transformers' Qwen3Config with the real model's sizes
(engine/presets), model.safetensors holding the dummy weights twinfer's own dummy load uses (the same seed), and a
word-level tokenizer whose vocabulary covers every token id ("t0", "t1", ...; the workload is token ids, so
only the vocabulary's size matters).
"""

import argparse
import json
from pathlib import Path

import torch


def write_config(model: str, folder: Path) -> None:
    """config.json through transformers' config class of the architecture, with the preset's sizes."""
    from transformers import AutoConfig

    from engine.model_config import load_model_config

    raw = json.loads(Path(load_model_config(model).source).read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.save_pretrained(folder)


def write_weights(model: str, folder: Path, device: str) -> Path:
    """model.safetensors with twinfer's dummy weights (seed 0), in the checkpoint's own tensor names."""
    from engine.loader import save_dummy_checkpoint
    from engine.model_config import load_model_config
    from engine.models import attention_features

    config = load_model_config(model)
    qkv_bias, qk_norm = attention_features(config.architecture, config.attention_bias)
    return save_dummy_checkpoint(config, folder, qkv_bias=qkv_bias, qk_norm=qk_norm, seed=0,
                                 dtype=torch.bfloat16, device=device)


def write_tokenizer(model: str, folder: Path) -> None:
    """A word-level tokenizer with one word per token id; the model's end-of-sequence id keeps its real name."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.model_config import load_model_config

    config = load_model_config(model)
    raw = json.loads(Path(config.source).read_text())
    eos_id = raw["eos_token_id"]
    vocab = {f"t{token_id}": token_id for token_id in range(config.vocab_size)}
    del vocab[f"t{eos_id}"]
    vocab["<|im_end|>"] = eos_id
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", eos_token="<|im_end|>").save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="qwen3-0.6b", help="a twinfer preset (engine/presets)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random weights are drawn")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    write_config(args.model, args.folder)
    weights = write_weights(args.model, args.folder, args.device)
    write_tokenizer(args.model, args.folder)
    print(f"wrote {args.folder}: config.json, {weights.name} ({weights.stat().st_size / 1e9:.2f} GB), tokenizer")


if __name__ == "__main__":
    main()
