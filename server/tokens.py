"""How text becomes token ids and where a completion ends, one rule each, for serving and training alike.

- A text prompt gets the tokenizer's special tokens (SmolLM2: none; Llama: a BOS), but a BOS the text
  already carries is not doubled.
- Chat messages are rendered by the model's chat template with the generation prompt, then tokenised
  without special tokens: the template writes its own.
- A completion stops at any EOS id of the model's generation config (the tokenizer's EOS when it names
  none) and at the token the chat template closes an assistant turn with. Training ends each completion
  with one of them: the template's turn end after chat messages, the first EOS after a text prompt. So
  a trained adapter ends an answer the way the model's own answers end, with a token the server stops at
  (Llama 3.1's generation config lists <|end_of_text|> first, its template closes a turn with <|eot_id|>).
"""

from __future__ import annotations

from transformers import GenerationConfig, PreTrainedTokenizerBase

_ANSWER = "reft-serve answer mark"  # rendered as an assistant turn to find what the template writes after one


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A text prompt's ids: the tokenizer's special tokens added, a BOS the text carries not doubled."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The chat template's text for `messages`, ending with the prompt of the assistant's answer."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def rendered_ids(tokenizer: PreTrainedTokenizerBase, rendered: str) -> list[int]:
    """Ids of a rendered chat: no special tokens added, the template wrote them."""
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    return rendered_ids(tokenizer, render_chat(tokenizer, messages, tools))


def eos_ids(tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig) -> list[int]:
    """The generation config's EOS ids in its order, or the tokenizer's EOS when it names none."""
    eos = generation.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else [int(e) for e in eos or ()]


def turn_end_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The added token the chat template writes right after an assistant's answer, if it writes one."""
    if not has_chat_template(tokenizer):
        return None
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this exchange names no turn end
        return None
    at = text.rfind(_ANSWER)
    tail = rendered_ids(tokenizer, text[at + len(_ANSWER):]) if at >= 0 else []
    return tail[0] if tail and tail[0] in tokenizer.added_tokens_decoder else None


def stop_ids(tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig) -> list[int]:
    """Every id that ends a completion (unless the request ignores EOS): the EOS ids, then the turn end."""
    ids = eos_ids(tokenizer, generation)
    end = turn_end_id(tokenizer)
    return ids + [end] if end is not None and end not in ids else ids


def completion_end_id(tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig, chat: bool) -> int:
    """The id a training completion ends with: the template's turn end after chat messages, else the first EOS."""
    end = turn_end_id(tokenizer) if chat else None
    if end is not None:
        return end
    ids = eos_ids(tokenizer, generation)
    if not ids:
        raise ValueError("the base model names no EOS token (generation config or tokenizer)")
    return ids[0]
