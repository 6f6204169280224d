"""Tiny Hugging Face model folders built offline: a random Qwen3 with a word-level or a byte-level BPE tokenizer."""

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""Qwen3's chat template in small: role markers, and an empty thought when enable_thinking is False."""

BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Ids 0, 1, 2 of the byte-level tokenizer; 0 is EOS."""

_CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "user assistant system: café naïve résumé 日本語 テキスト",
    "stop strings may cross token boundaries; detokenize incrementally!",
]


def save_tiny_qwen3(folder: Path, vocab_size: int, eos_token_id: int, seed: int = 0) -> None:
    """A two-layer Qwen3 with random weights, saved as safetensors."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, eos_token_id=eos_token_id, tie_word_embeddings=True)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)


def save_word_level_tokenizer(folder: Path, vocab_size: int) -> None:
    """Tokens "<unk>", "<eos>", "w0", "w1", ...: a word per token, split at whitespace."""
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(vocab_size - 2)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)


def save_byte_level_tokenizer(folder: Path, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE trained on a few sentences: spaces inside tokens, multi-byte characters
    split over several tokens, special tokens, and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                                additional_special_tokens=BPE_SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
