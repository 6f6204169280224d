"""Log-probabilities in the OpenAI API's shapes, from the engine's vLLM-shaped Logprob dicts (one per token: the
token's own entry first, then the most likely tokens).

Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`, where top_logprobs maps each listed token's
text to its logprob (the sampled token and the `logprobs` most likely, so up to logprobs + 1 entries, as OpenAI
documents). Chat: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`, where
top_logprobs lists the `top_logprobs` most likely tokens, most likely first. JSON has no -inf: a logprob below
-9999 is given as -9999, as vLLM does.
"""

from engine.outputs import Logprob

MIN_LOGPROB = -9999.0

LogprobDict = dict[int, Logprob]


def token_text(token_id: int, logprob: Logprob | None, tokenizer, as_token_id: bool) -> str:
    """How a token is named in logprobs: its text, or "token_id:ID" when asked (or when there is no tokenizer)."""
    if not as_token_id:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        if tokenizer is not None:
            return tokenizer.decode([token_id])
    return f"token_id:{token_id}"


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, MIN_LOGPROB)


def completion_logprobs(token_ids: list[int], entries: list[LogprobDict | None], tokenizer, *, text_offset: int = 0,
                        as_token_ids: bool = False) -> dict:
    """A completion choice's logprobs for these tokens; an entry None (a prompt's first token, which nothing
    predicts) has a null logprob. text_offset: where the first token's text starts in the choice's text."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        own = entry.get(token_id) if entry is not None else None
        token = token_text(token_id, own, tokenizer, as_token_ids)
        tokens.append(token)
        token_logprobs.append(None if own is None else _value(own))
        top_logprobs.append(None if entry is None else {
            token_text(top_id, top, tokenizer, as_token_ids): _value(top) for top_id, top in entry.items()})
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[LogprobDict], num_top: int, tokenizer, *,
                  as_token_ids: bool = False) -> dict:
    """A chat choice's logprobs for these tokens, each with its num_top most likely alternatives."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        own = entry[token_id]
        most_likely = sorted(entry.items(), key=lambda item: item[1].rank)[:num_top]
        content.append({**_chat_token(token_id, own, tokenizer, as_token_ids), "top_logprobs": [
            _chat_token(top_id, top, tokenizer, as_token_ids) for top_id, top in most_likely]})
    return {"content": content}


def _chat_token(token_id: int, logprob: Logprob, tokenizer, as_token_id: bool) -> dict:
    token = token_text(token_id, logprob, tokenizer, as_token_id)
    return {"token": token, "logprob": _value(logprob), "bytes": list(token.encode("utf-8", errors="replace"))}


def prompt_logprobs_json(entries: list[LogprobDict | None]) -> list[dict | None]:
    """vLLM's prompt_logprobs field: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}}."""
    return [None if entry is None else {
        str(token_id): {"logprob": _value(logprob), "rank": logprob.rank, "decoded_token": logprob.decoded_token}
        for token_id, logprob in entry.items()} for entry in entries]
