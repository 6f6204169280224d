"""A sequence's output text, decoded token by token as the engine samples, and its stop strings.

Follows vLLM v0.11's detokenizer: text grows through the tokenizers library's DecodeStream (a character split
over several tokens appears once complete), primed with the prompt's last tokens so the first output token gets
the spacing it has after the prompt; a stop string is searched for in the new text and in the stop string's
length minus one characters before it, so it is found across token boundaries; the text then ends before it
(or after it with include_stop_str_in_output). A token that ends the sequence as EOS or a stop token adds no
text unless include_stop_str_in_output. One difference: when one step's text holds two stop strings, the one
that starts first wins (vLLM takes the first in the stop list), so the text never contains a stop string.
"""

from tokenizers.decoders import DecodeStream

from engine.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
_MIN_PRIMING_TOKENS, _MAX_PRIMING_TOKENS = 4, 24


class IncrementalDetokenizer:
    """Decodes one sequence's output tokens as they come and reports the stop string one completes."""

    def __init__(self, tokenizer, prompt_token_ids, params: SamplingParams) -> None:
        """tokenizer: a transformers fast tokenizer (one with a backend_tokenizer)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"decoding text as it is generated needs a fast tokenizer (one backed by the tokenizers "
                             f"library); {type(tokenizer).__name__} is not")
        self._backend = backend
        self._skip_special_tokens = params.skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.stop = params.stop
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.num_output_tokens = 0
        self.output_text = ""
        self._hold_back = 0
        """Characters kept back from a running sequence's text: the start of a stop string may be there."""
        if self.stop and not self.include_stop_str_in_output:
            self._hold_back = max(len(stop) for stop in self.stop) - 1
        for token_id in self._priming_tokens(list(prompt_token_ids)):
            self._step(token_id)

    def _priming_tokens(self, prompt: list[int]) -> list[int]:
        """The shortest prompt suffix of at least 4 tokens that decodes to whole characters (a suffix starting
        inside a multi-byte character would garble the first output token)."""
        if len(prompt) <= _MIN_PRIMING_TOKENS:
            return prompt
        for length in range(_MIN_PRIMING_TOKENS, min(len(prompt), _MAX_PRIMING_TOKENS) + 1):
            suffix = prompt[-length:]
            if _REPLACEMENT not in self._backend.decode(suffix, skip_special_tokens=self._skip_special_tokens):
                return suffix
        return prompt[-_MIN_PRIMING_TOKENS:]

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as error:  # the library's message is the only way to tell this case
            if "Invalid prefix" not in str(error):
                raise
            # Tokens whose bytes decode to text that does not extend the text before (rare, with byte
            # fallback) break the stream's state: start a fresh one from this token.
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._backend, token_id)

    def update(self, token_id: int, stop_terminated: bool) -> str | None:
        """Add the next output token; return the stop string it completes, if any (the text is cut there).

        stop_terminated: the token ends the sequence as EOS or a stop token (its text is left out unless
        include_stop_str_in_output)."""
        self.num_output_tokens += 1
        if stop_terminated and not self.include_stop_str_in_output:
            return None
        piece = self._step(token_id)
        if not piece:
            return None
        checked = len(self.output_text)
        self.output_text += piece
        if self.stop and self.num_output_tokens > self.min_tokens:
            return self._cut_at_stop(checked)
        return None

    def _cut_at_stop(self, checked: int) -> str | None:
        text = self.output_text
        found_at, found = len(text), None
        for stop in self.stop:
            index = text.find(stop, max(0, checked - len(stop) + 1))
            if index != -1 and index < found_at:
                found_at, found = index, stop
        if found is None:
            return None
        self.output_text = text[:found_at + len(found)] if self.include_stop_str_in_output else text[:found_at]
        return found

    def text(self, finished: bool) -> str:
        """The text so far; while the sequence runs, without the last characters a stop string may begin in."""
        if finished or not self._hold_back:
            return self.output_text
        return self.output_text[:max(0, len(self.output_text) - self._hold_back)]
