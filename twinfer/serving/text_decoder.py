"""A completion's text as its tokens arrive: each call returns only the new characters."""

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 4
"""Prompt tokens decoded before the output, so its first token gets the spacing it has after the prompt."""


class TextDecoder:
    """Decodes the output so far with a few prompt tokens before it, and returns what was not returned yet.

    A trailing replacement character (a character split over tokens) is held back until it is complete.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = self._decode()
        self.text = ""
        """The output's text returned so far."""

    def _decode(self) -> str:
        return self._tokenizer.decode(self._token_ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """The text the new tokens add (the whole rest when final)."""
        if not token_ids and not final:
            return ""
        self._token_ids.extend(token_ids)
        decoded = self._decode()
        if not decoded.startswith(self._prefix):
            return ""  # the prompt's context decodes differently once joined: nothing safe to return yet
        text = decoded[len(self._prefix):]
        if not final:
            text = text.rstrip(_REPLACEMENT)
        if len(text) <= len(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new
