"""Per-request sampling settings, validated where they are built (vLLM v0.11's SamplingParams and messages)."""

import math
from dataclasses import dataclass, field, replace

_SAMPLING_EPS = 1e-5
"""A temperature below this is greedy (vLLM's rule)."""
_MAX_LOGIT_BIAS = 100.0
"""logit_bias values are clamped to [-100, 100], as OpenAI's API and vLLM do."""


def _is_int(value) -> bool:
    # The exact type first: one SamplingParams is built per request of a replayed trace.
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def _is_number(value) -> bool:
    """An int or float, not a bool (NaN passes here and fails every range check)."""
    if type(value) is float or type(value) is int:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _token_ids(name: str, values) -> tuple[int, ...]:
    """values as a tuple of non-negative token ids, or a ValueError naming the field."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of token ids, got {values!r}")
    ids = tuple(values)
    for token_id in ids:
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"{name} must contain only non-negative integers, got {token_id!r} in {list(ids)}")
    return ids


def _strings(name: str, values) -> tuple[str, ...]:
    """A str or a list of str as a tuple without duplicates; no empty string (vLLM's rule)."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = (values,)
    if not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a string or a list of strings, got {values!r}")
    strings = tuple(dict.fromkeys(values))
    for value in strings:
        if not isinstance(value, str):
            raise ValueError(f"{name} must contain only strings, got {value!r}")
        if not value:
            raise ValueError(f"{name} cannot contain an empty string")
    return strings


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop, with vLLM v0.11's fields, defaults and meanings.

    temperature below 1e-5 is greedy (then top_p, top_k and min_p are reset, and n must be 1); top_k 0 or -1
    and top_p 1.0 disable those filters. The order on the logits is vLLM's: allowed_token_ids, bad_words,
    min_tokens, logit_bias, the penalties, then temperature, min_p, top-k, top-p. Lists given are kept as
    tuples, so a SamplingParams can be shared by many requests.
    """

    n: int = 1
    """Completions to return for the prompt; they share the prompt's KV blocks (one prefill)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated; in [-2, 2]."""
    repetition_penalty: float = 1.0
    """For tokens in the prompt or the output: positive logits divided by it, negative ones multiplied."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one (after temperature); in [0, 1]."""
    seed: int | None = None
    """This request's own random stream: the same tokens whatever else shares the batch."""
    stop: tuple[str, ...] = ()
    """Strings that end generation (a str or a list of them); the text returned stops before them."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end generation; they stay in token_ids."""
    bad_words: tuple[str, ...] = ()
    """Words never generated: the last token of a word's tokens is banned where the tokens before it match
    the end of the output (needs the engine's tokenizer, which fills bad_words_token_ids)."""
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    """None: up to the model's max_model_len."""
    min_tokens: int = 0
    """EOS and stop_token_ids are impossible (and stop strings ignored) before this many output tokens."""
    logprobs: int | None = None
    """Return, per output token, the log-probability of the sampled token and of the `logprobs` most likely
    ones, from the model's raw distribution (before penalties and temperature)."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (such a request skips the prefix cache)."""
    detokenize: bool = True
    """False: no text (CompletionOutput.text stays "")."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    """Accepted as vLLM accepts it; twinfer decodes with fast tokenizers only, whose decoders never put spaces
    between special tokens, so it changes nothing here."""
    logit_bias: dict[int, float] | None = field(default=None, hash=False)
    """Added to the logits of these token ids (values clamped to [-100, 100])."""
    allowed_token_ids: tuple[int, ...] | None = None
    """Only these tokens may be generated."""
    truncate_prompt_tokens: int | None = None
    """Keep only the last k prompt tokens (-1: the last max_model_len - 1)."""
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    """bad_words as token sequences (twinfer's; with_tokenizer fills it, or give token ids directly)."""
    needs_token_history: bool = field(default=False, init=False, repr=False, compare=False)
    """Whether the sampler needs the request's earlier tokens (penalties, multi-token bad words)."""
    uses_logits_processors: bool = field(default=False, init=False, repr=False, compare=False)
    """Whether any logit is changed before temperature (penalties, bias, bans, allowed tokens, min_tokens)."""
    stops_on_tokens: bool = field(default=True, init=False, repr=False, compare=False)
    """Whether a sampled token may stop the request (a stop token, or EOS unless ignored); False: only its length
    (or a stop string) ends it, which the scheduler checks without looking at the token."""

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_lengths()
        # The lists are checked only when given: a trace replay builds one SamplingParams per request.
        set_field = object.__setattr__
        if self.stop:
            set_field(self, "stop", _strings("stop", self.stop))
            if not self.detokenize:
                raise ValueError("stop strings are only supported when detokenize is True")
        elif self.stop != ():
            set_field(self, "stop", ())
        if self.bad_words:
            set_field(self, "bad_words", _strings("bad_words", self.bad_words))
        elif self.bad_words != ():
            set_field(self, "bad_words", ())
        if self.stop_token_ids:
            set_field(self, "stop_token_ids", tuple(dict.fromkeys(_token_ids("stop_token_ids", self.stop_token_ids))))
        elif self.stop_token_ids != ():
            set_field(self, "stop_token_ids", ())
        if self.allowed_token_ids is not None:
            allowed = _token_ids("allowed_token_ids", self.allowed_token_ids)
            if not allowed:
                raise ValueError("allowed_token_ids is not None and empty: no token could be generated")
            set_field(self, "allowed_token_ids", allowed)
        if self.logit_bias is not None:
            set_field(self, "logit_bias", _logit_bias(self.logit_bias))
        words = self.bad_words_token_ids
        if words:
            words = tuple(_token_ids("bad_words_token_ids", word) for word in words)
            if any(not word for word in words):
                raise ValueError("bad_words_token_ids cannot contain an empty token sequence")
            set_field(self, "bad_words_token_ids", words)
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the filters cannot change the argmax, so they are reset (vLLM's rule).
            set_field(self, "top_p", 1.0)
            set_field(self, "top_k", 0)
            set_field(self, "min_p", 0.0)
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}")
        penalized = self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
        if penalized or words:
            set_field(self, "needs_token_history", penalized or any(len(word) > 1 for word in words))
        if penalized or words or self.min_tokens or self.logit_bias or self.allowed_token_ids is not None:
            set_field(self, "uses_logits_processors", True)
        set_field(self, "stops_on_tokens", bool(self.stop_token_ids) or not self.ignore_eos)

    def _check_numbers(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer of at least 1, got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number greater than zero, got "
                             f"{self.repetition_penalty!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite non-negative number (0 is greedy), "
                             f"got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), -1 (disable) or at least 1, got {self.top_k}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < -1):
                raise ValueError(f"{name} must be a non-negative integer, -1 (the whole vocabulary) or None, "
                                 f"got {value!r}")

    def _check_lengths(self) -> None:
        if self.max_tokens is not None:
            if not _is_int(self.max_tokens):
                raise ValueError(f"max_tokens must be an integer or None, got {self.max_tokens!r}")
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens}")
        truncate = self.truncate_prompt_tokens
        if truncate is not None and (not _is_int(truncate) or truncate == 0 or truncate < -1):
            raise ValueError(f"truncate_prompt_tokens must be an integer >= 1, -1 (max_model_len) or None, "
                             f"got {truncate!r}")

    @property
    def greedy(self) -> bool:
        """True when the next token is always the argmax (of the logits after any processors)."""
        return self.temperature < _SAMPLING_EPS or self.top_k == 1

    def with_tokenizer(self, tokenizer) -> "SamplingParams":
        """These params with bad_words turned into token sequences by the tokenizer (vLLM's
        update_from_tokenizer: each word at the start of the text and, when that differs, after a space)."""
        if not self.bad_words:
            return self
        sequences: list[tuple[int, ...]] = []
        for word in self.bad_words:
            alone = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
            if not alone:
                raise ValueError(f"bad_words entry {word!r} encodes to no token")
            sequences.append(alone)
            after_space = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            # The spaced form is a different word only when it starts with another token of the same count.
            if after_space and after_space[0] != alone[0] and len(after_space) == len(alone):
                sequences.append(after_space)
        return replace(self, bad_words_token_ids=tuple(sequences))

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids outside [0, vocab_size) and more log-probabilities than MAX_LOGPROBS, naming the field."""
        if not (self.stop_token_ids or self.allowed_token_ids or self.logit_bias or self.bad_words_token_ids
                or self.logprobs is not None or self.prompt_logprobs is not None):
            return
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("allowed_token_ids", self.allowed_token_ids or ()),
                          ("logit_bias", tuple(self.logit_bias or ())),
                          ("bad_words_token_ids", [t for word in self.bad_words_token_ids for t in word])):
            outside = sorted({token_id for token_id in ids if token_id >= vocab_size})
            if outside:
                raise ValueError(f"{name} has token id(s) {outside} outside the vocabulary [0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            wanted = vocab_size if value == -1 else value
            if wanted is not None and wanted > MAX_LOGPROBS:
                raise ValueError(f"{name}: requested {wanted} log-probabilities per token, which is greater than "
                                 f"the most allowed, {MAX_LOGPROBS}")


MAX_LOGPROBS = 20
"""The most log-probabilities a request may ask for per token (vLLM's default max_logprobs)."""


def _logit_bias(bias) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id to bias, got {bias!r}")
    clamped = {}
    for token, value in bias.items():
        try:
            token_id = int(token)  # OpenAI's JSON gives the ids as strings
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias key {token!r} is not a token id") from None
        if token_id < 0:
            raise ValueError(f"logit_bias key {token!r} is not a token id (negative)")
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"logit_bias[{token!r}] must be a finite number, got {value!r}")
        clamped[token_id] = min(_MAX_LOGIT_BIAS, max(-_MAX_LOGIT_BIAS, float(value)))
    return clamped
