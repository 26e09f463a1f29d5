"""Tokens as bytes and text for logprobs: a token of a byte-level BPE vocabulary may hold part of a UTF-8
character (an emoji is often three tokens), which `decode([token])` turns into U+FFFD."""

from __future__ import annotations

import functools

from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode


class TokenBytes:
    """What each token adds to the text, as bytes, and how to show a token on its own."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.added_tokens_decoder  # type: ignore[attr-defined]
        self.special = frozenset(i for i, token in added.items() if token.special)
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        # Byte-level vocabularies (GPT-2 style: "Ġ" for a space) spell every token in the byte alphabet;
        # others (SentencePiece: "▁") are decoded token by token instead.
        vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
        self.byte_level = all(c in self._byte_of for piece, i in vocab.items() if i not in added for c in piece)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one per tokenizer, alive as long as the server
    def bytes_of(self, token: int) -> bytes:
        """The token's bytes in the text; a special token's own spelling (it is not in the decoded text)."""
        piece = self.tokenizer.convert_ids_to_tokens(token)  # type: ignore[attr-defined]
        if token in self.special or not self.byte_level:
            return (piece if token in self.special else self.tokenizer.decode([token])).encode()  # type: ignore[attr-defined]
        return bytes(self._byte_of[c] for c in piece)

    def text_of(self, token: int) -> str:
        """The token as text, or OpenAI's "bytes:\\xNN..." when it is part of a character."""
        data = self.bytes_of(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def in_text(self, token: int) -> bytes:
        """What the token adds to the decoded text (special tokens are skipped there)."""
        return b"" if token in self.special else self.bytes_of(token)
