"""Tool calling on chat: the tools into the prompt, the constraint that `required` or a named function puts on
the answer, and the answer back into OpenAI's `tool_calls`.

A call is the JSON object {"name": ..., "arguments": {...}}. With `required` or a named function the
answer is constrained to exactly that object (its arguments to the function's schema), so it always
parses. With `auto` nothing is constrained: the answer is a call only if the model wrote one, wrapped
in <tool_call>...</tool_call> (the Hermes convention that Qwen and SmolLM templates use) or as the
bare object naming a known tool; a template that does not take `tools` itself gets them, and that
convention, in a system message.

Streamed, a constrained call goes out as it is written: OpenAI's first tool-call delta (id, type, name)
once the name is complete, then the arguments' text in fragments. An `auto` answer is held until it
ends, since only then is it known to be a call or text.
"""

from __future__ import annotations

import json
import re
import uuid

from server.api.protocol import (
    ChatDelta,
    ChatMessage,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from server.api.serving import ServingError
from server.engine.structured import Constraint

_TAGGED = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
# A constrained call's text up to its arguments: compact JSON, properties in the call schema's order.
_HEAD = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"arguments":')
ANY_ARGUMENTS = {"type": "object"}  # a function declared without parameters takes any object


def active(tools: list[Tool] | None, choice: str | NamedToolChoice | None) -> bool:
    """Whether the request's tools are offered to the model at all (not with tool_choice none)."""
    if not tools:
        if choice not in (None, "none"):
            raise ServingError(400, "tool_choice needs tools")
        return False
    return choice != "none"


def constraint(tools: list[Tool], choice: str | NamedToolChoice | None) -> Constraint | None:
    """The answer's schema: one call to the named function, or to any of the tools (`required`); None for auto."""
    if choice in (None, "auto"):
        return None
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise ServingError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                    f"({', '.join(t.function.name for t in tools)})")
        return Constraint.json_schema(_call_schema(named[0]))
    calls = [_call_schema(t) for t in tools]
    return Constraint.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})


def _call_schema(tool: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": tool.function.parameters or ANY_ARGUMENTS},
            "required": ["name", "arguments"], "additionalProperties": False}


def render(messages: list[ChatMessage], tools: list[Tool] | None,
           template: str) -> tuple[list[dict], list[dict] | None]:
    """Messages (with earlier calls and tool results) and tools as the chat template takes them.

    A template that uses `tools` gets them, and earlier calls as `tool_calls` with parsed arguments; any
    other gets the tools in a system message and earlier calls written out in the answer format.
    """
    takes_tools = "tools" in template
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(d.get("content"), list):
            d["content"] = "".join(p.get("text", "") for p in d["content"] if p.get("type") == "text")
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
            if takes_tools:
                d["tool_calls"] = [{"type": "function", "id": c.id, "function": call}
                                   for c, call in zip(m.tool_calls, calls, strict=True)]
            else:
                d.pop("tool_calls")
                d["content"] = (d.get("content") or "") + "".join(
                    f"<tool_call>{json.dumps(call)}</tool_call>" for call in calls)
        d.setdefault("content", "")
        out.append(d)
    if not tools:
        return out, None
    specs = [t.model_dump(exclude_none=True) for t in tools]
    if takes_tools:
        return out, specs
    system = ("You can call these functions. To call one, answer with nothing but "
              '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>.\n'
              f"Functions: {json.dumps([s['function'] for s in specs])}")
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{system}")
    else:
        out.insert(0, {"role": "system", "content": system})
    return out, None


def _arguments(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServingError(400, f"an assistant message's tool call has arguments that are not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ServingError(400, "an assistant message's tool call arguments must be a JSON object")
    return value


def parse(text: str, tools: list[Tool], constrained: bool) -> list[ToolCall] | None:
    """The calls in an answer, or None if it is not a call (auto) or stopped inside one (max_tokens).

    A constrained call's arguments are its own text, as streamed; a call the model wrote freely has them
    written out again compactly."""
    if constrained:
        call = _constrained(text)
        return [_call(*call)] if call else None
    names = {t.function.name for t in tools}
    calls = []
    for candidate in _TAGGED.findall(text) or [text.strip()]:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            return None
        if not (isinstance(value, dict) and value.get("name") in names and isinstance(value.get("arguments"), dict)):
            return None
        calls.append(_call(value["name"], json.dumps(value["arguments"], separators=(",", ":"), ensure_ascii=False)))
    return calls


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=_call_id(), function=FunctionCall(name=name, arguments=arguments))


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _constrained(text: str) -> tuple[str, str] | None:
    """A complete constrained call's name and arguments text; None if the answer stopped inside it."""
    head = _HEAD.match(text)
    if head is None or not text.endswith("}"):
        return None
    try:
        value, arguments = json.loads(text), json.loads(text[head.end():-1])
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("arguments") != arguments:
        return None
    return value["name"], text[head.end():-1]


class StreamedAnswer:
    """One streamed chat choice with tools offered: its text in, OpenAI's deltas out.

    Constrained (`required` or a named function): the call's first delta (id, type, name) as soon as the
    name is complete, then each new piece of the arguments, holding back a last `}` that may be the
    call's own closing brace. The deltas add up to exactly the arguments a non-streamed answer carries.
    `auto`: held until the end, then sent as one call per call found, or as text.
    """

    def __init__(self, tools: list[Tool], constrained: bool) -> None:
        self.tools = tools
        self.constrained = constrained
        self.text = ""
        self.arguments_at: int | None = None  # where the arguments begin in `text`, once the name is sent
        self.sent = 0  # characters of the arguments sent

    def feed(self, piece: str, finish_reason: str | None) -> tuple[list[ChatDelta], str | None]:
        """The deltas that `piece` releases, and the finish reason to send (None until the answer ends)."""
        self.text += piece
        if finish_reason is None:
            return (self._progress() if self.constrained else []), None
        calls = parse(self.text, self.tools, self.constrained)
        if self.constrained:
            deltas = self._progress()
            if calls:
                return deltas + self._release(self.text[self.arguments_at:-1]), "tool_calls"
            if self.arguments_at is None:  # stopped by max_tokens before the name was complete
                return ([ChatDelta(content=self.text)] if self.text else []), finish_reason
            return deltas + self._release(self.text[self.arguments_at:]), finish_reason
        if calls:
            deltas = [(_named(k, c.id, c.function.name), _arguments_delta(k, c.function.arguments))
                      for k, c in enumerate(calls)]
            return [d for pair in deltas for d in pair], "tool_calls"
        return ([ChatDelta(content=self.text)] if self.text else []), finish_reason

    def _progress(self) -> list[ChatDelta]:
        deltas = []
        if self.arguments_at is None:
            head = _HEAD.match(self.text)
            if head is None:
                return []
            self.arguments_at = head.end()
            deltas.append(_named(0, _call_id(), json.loads(head.group(1))))
        arguments = self.text[self.arguments_at:]
        return deltas + self._release(arguments[:-1] if arguments.endswith("}") else arguments)

    def _release(self, arguments: str) -> list[ChatDelta]:
        """The arguments' text not yet sent, as one delta (none if nothing is new)."""
        fresh, self.sent = arguments[self.sent:], max(self.sent, len(arguments))
        return [_arguments_delta(0, fresh)] if fresh else []


def _arguments_delta(index: int, text: str) -> ChatDelta:
    return ChatDelta(tool_calls=[ToolCallDelta(index=index, function=FunctionCallDelta(arguments=text))])


def _named(index: int, call_id: str, name: str) -> ChatDelta:
    return ChatDelta(tool_calls=[ToolCallDelta(index=index, id=call_id, type="function",
                                               function=FunctionCallDelta(name=name, arguments=""))])
