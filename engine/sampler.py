"""Token sampling on the device: logits processors, greedy, temperature, min-p, top-k, top-p, per-request seeds,
and log-probabilities, in vLLM v0.11's order.

Sampling uses the exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability
p_i (computed as argmax(logit_i - log E_i), the Gumbel-max trick, so no softmax is needed). Unseeded rows draw E from the engine's generator; a seeded row derives E from a counter-based hash of
(its seed, the index of the token being sampled, the token id), so it gets the same token whatever else
shares the batch.
"""

import zlib
from dataclasses import dataclass

import torch

from engine.layers.fusion import fusable
from engine.logits_processors import ProcessorTensors, apply_logits_processors

# Odd 64-bit constants (splitmix64 and golden-ratio multipliers) written as signed int64.
_K_SEED = 0x9E3779B97F4A7C15 - (1 << 64)
_K_INDEX = 0xBF58476D1CE4E5B9 - (1 << 64)
_K_TOKEN = 0x94D049BB133111EB - (1 << 64)
_MIX_1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX_2 = 0x94D049BB133111EB - (1 << 64)


def seed_key(seed: int) -> int:
    """A request seed folded to 31 bits (any Python int works, negatives and > 64 bits included)."""
    data = seed.to_bytes((seed.bit_length() + 8) // 8 + 1, "little", signed=True)
    return zlib.crc32(data) & 0x7FFFFFFF


@dataclass(frozen=True, slots=True)
class SamplingTensors:
    """Per-row sampling settings on the device; None fields mean no row uses that feature."""

    temperatures: torch.Tensor | None = None
    """[rows] float32; 0 marks a greedy row. None: every row is greedy."""
    top_k: torch.Tensor | None = None
    """[rows] int32; 0 disables. None: no row uses top-k."""
    top_p: torch.Tensor | None = None
    """[rows] float32; 1 disables. None: no row uses top-p."""
    seeded_rows: torch.Tensor | None = None
    """[seeded] row indices of rows with their own seed."""
    seed_keys: torch.Tensor | None = None
    """[seeded] seed_key(seed) of those rows."""
    output_indices: torch.Tensor | None = None
    """[seeded] index of the output token each of those rows samples now."""
    min_p: torch.Tensor | None = None
    """[rows] float32; 0 disables. None: no row uses min-p."""
    processors: ProcessorTensors | None = None
    """Logit changes before temperature (penalties, bias, bans); None: no row has any."""
    logprob_rows: torch.Tensor | None = None
    """[asking] rows whose requests want logprobs. None: no row does."""
    num_logprobs: int = 0
    """The most top tokens any of those rows wants (-1: the whole vocabulary)."""


def _logical_right_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def seeded_exponential(seed_keys: torch.Tensor, output_indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [rows, vocab], a pure function of (seed key, output index, token id)."""
    tokens = torch.arange(vocab_size, device=seed_keys.device, dtype=torch.int64)
    x = (seed_keys.long() * _K_SEED + output_indices.long() * _K_INDEX)[:, None] + tokens[None, :] * _K_TOKEN
    # splitmix64's finalizer: every input bit affects every output bit.
    x = x ^ _logical_right_shift(x, 30)
    x = x * _MIX_1
    x = x ^ _logical_right_shift(x, 27)
    x = x * _MIX_2
    x = x ^ _logical_right_shift(x, 31)
    uniform = (_logical_right_shift(x, 40).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(uniform)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit whose probability is below its row's min_p times the row's highest probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf every logit outside its row's top-k and outside its nucleus (the token crossing p is kept)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab_size = logits.shape[-1]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k <= 0, vocab_size, top_k).to(torch.int64)
        drop |= torch.arange(vocab_size, device=logits.device)[None, :] >= k[:, None]
    if top_p is not None:
        # top-p applies to the distribution left after top-k, as in vLLM and transformers.
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


class Sampler:
    """Picks one token per row of logits, on the logits' device."""

    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """Token ids [rows] (int64) for logits [rows, vocab] (which are left as they are)."""
        if params.processors is not None:
            logits = apply_logits_processors(logits, params.processors)
        if params.temperatures is None:
            return logits.argmax(dim=-1)
        temperatures = params.temperatures
        if params.top_k is not None or params.top_p is not None or params.min_p is not None:
            # Filter the temperature-scaled logits; greedy rows keep their argmax (top-1 is never dropped).
            is_greedy = temperatures == 0
            scaled = logits.float() / torch.where(is_greedy, 1.0, temperatures)[:, None]
            if params.min_p is not None:
                scaled = apply_min_p(scaled, params.min_p)
            if params.top_k is not None or params.top_p is not None:
                scaled = apply_top_k_top_p(scaled, params.top_k, params.top_p)
            logits = scaled
            temperatures = torch.where(is_greedy, 0.0, 1.0)
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(
            generator=self.generator)
        if params.seeded_rows is not None:
            noise[params.seeded_rows] = seeded_exponential(params.seed_keys, params.output_indices, logits.shape[-1])
        return perturbed_argmax(logits, temperatures, noise)


@fusable("engine.kernels.perturbed_argmax:perturbed_argmax")
def perturbed_argmax(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per row: argmax(logits / T - log E), which samples softmax(logits / T); rows with T = 0 take the argmax.

    argmax(p / E) = argmax(logits / T - log E): the softmax's normalization never changes the argmax.
    """
    is_greedy = temperatures == 0
    scaled = logits.float() / torch.where(is_greedy, 1.0, temperatures)[:, None]
    sampled = (scaled - noise.log()).argmax(dim=-1)
    return torch.where(is_greedy, scaled.argmax(dim=-1), sampled)
