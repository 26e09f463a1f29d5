"""OpenAI's logprob shapes, built from the engine's `TokenLogprobs`: completions' legacy shape and chat's."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from server.api.protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs
from server.api.token_bytes import TokenBytes
from server.engine.sampling import TokenLogprobs


class CompletionLogprobsWriter:
    """Builds the legacy `logprobs` object piece by piece (a whole answer, or one stream chunk at a time).

    `text_offset` is each token's start in the returned text, in characters: the text decoded so far from
    the tokens' bytes, so a token holding the middle of a character starts where that character does, and
    special tokens (absent from the text) take no room.
    """

    def __init__(self, tokens: TokenBytes) -> None:
        self.tokens = tokens
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs | None]) -> CompletionLogprobs:
        """`logprobs[i]` is token i's (None: no logprob, as for the echoed prompt's first token)."""
        out = CompletionLogprobs()
        for token, lp in zip(token_ids, logprobs, strict=True):
            text = self.tokens.text_of(token)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(self._decoder.decode(self.tokens.in_text(token)))
            out.token_logprobs.append(None if lp is None else lp.logprob)
            out.top_logprobs.append(None if lp is None else self._top(text, lp))
        return out

    def echo(self, text: str, token_ids: Sequence[int], prompt_logprobs: Sequence[TokenLogprobs] | None
             ) -> CompletionLogprobs:
        """An echoed prompt's tokens, the first without a logprob; the completion's tokens follow its text."""
        self.offset = 0
        self._decoder.reset()
        echoed = self.piece(token_ids, [None, *(prompt_logprobs or ())])
        self.offset = len(text)
        self._decoder.reset()
        return echoed

    def _top(self, text: str, lp: TokenLogprobs) -> dict[str, float]:
        """The asked-for alternatives, and the token itself if it is not among them (as vLLM does)."""
        top = {self.tokens.text_of(t): v for t, v in lp.top}
        top.setdefault(text, lp.logprob)
        return top


def merge(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    """`a`'s tokens, then `b`'s (an echoed prompt, then its completion)."""
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], tokens: TokenBytes) -> ChatLogprobs:
    """Chat's shape: per generated token its text, logprob, bytes and exactly the asked-for alternatives."""

    def entry(token: int, logprob: float) -> ChatTopLogprob:
        return ChatTopLogprob(token=tokens.text_of(token), logprob=logprob, bytes=list(tokens.bytes_of(token)))

    content = []
    for token, lp in zip(token_ids, logprobs, strict=True):
        first = entry(token, lp.logprob)
        content.append(ChatTokenLogprob(**first.model_dump(), top_logprobs=[entry(t, v) for t, v in lp.top]))
    return ChatLogprobs(content=content)
