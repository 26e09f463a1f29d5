"""Tool calling on chat: the tools into the prompt, the constraint that `required` or a named function puts on
the answer, and the answer back into OpenAI's `tool_calls`.

A call is the JSON object {"name": ..., "arguments": {...}}. With `required` or a named function the
answer is constrained to exactly that object (its arguments to the function's schema), so it always
parses. With `auto` nothing is constrained: the answer is a call only if the model wrote one, wrapped
in <tool_call>...</tool_call> (the Hermes convention that Qwen and SmolLM templates use) or as the
bare object naming a known tool; a template that does not take `tools` itself gets them, and that
convention, in a system message.
"""

from __future__ import annotations

import json
import re
import uuid

from server.api.protocol import ChatMessage, FunctionCall, NamedToolChoice, Tool, ToolCall
from server.api.serving import ServingError
from server.engine.structured import Constraint

_TAGGED = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
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
    """The calls in an answer, or None if it is not a call (auto) or stopped inside one (max_tokens)."""
    names = {t.function.name for t in tools}
    candidates = [text] if constrained else (_TAGGED.findall(text) or [text.strip()])
    calls = []
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            return None
        if not (isinstance(value, dict) and value.get("name") in names and isinstance(value.get("arguments"), dict)):
            return None
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                              function=FunctionCall(name=value["name"], arguments=json.dumps(value["arguments"]))))
    return calls
