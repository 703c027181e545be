"""What a request asks the answer to look like, as one record: OpenAI ``response_format``, Ollama
``format``, the Responses API's ``text.format`` and a forced tool call (``tool_choice`` + ``tools``)
all become a ``ResponseFormat`` with the schema to compile and a stable cache key.

``strict`` (OpenAI json_schema, Responses text.format, a tool's function) is kept on the record
but does not change the grammar: the whole schema is enforced either way (there is no best-effort
mode), and objects with properties are closed either way (schema.py says why). ``required`` is never
changed: a property left out of it may be left out of the answer.

A forced tool call is answered as one JSON object ``{"name": <a tool's name>, "arguments": {...}}``
whose arguments validate against that tool's ``parameters``; ``tool_call_from_text`` reads it back
for the adapters (OpenAI and Ollama ``message.tool_calls``). One call per answer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rksmolvlm.runtime.structured.errors import FormatShapeError
from rksmolvlm.runtime.structured.schema import DEFAULT_SCHEMA_LIMITS, SchemaLimits, prepare_schema

__all__ = ["ResponseFormat", "ToolCall", "TEXT", "from_openai_response_format", "from_ollama_format",
           "from_responses_text_format", "from_tool_choice", "tool_call_from_text"]

FormatKind = Literal["text", "json_object", "json_schema", "tool_call"]

# "Any JSON object": OpenAI's json_object and Ollama's "json" (both promise an object).
_ANY_OBJECT: dict = {"type": "object"}


@dataclass(frozen=True)
class ResponseFormat:
    """One request's answer format. ``schema_json`` is the checked schema to compile (None for
    text), ``key`` identifies the compiled grammar (equal schemas share it; the name does not count)."""

    kind: FormatKind
    schema_json: str | None = None
    name: str | None = None
    strict: bool = False
    tool_names: tuple[str, ...] = ()  # tool_call: the functions the answer may call
    param: str = ""  # the request field the format came from, for error messages

    @property
    def constrained(self) -> bool:
        return self.kind != "text"

    @property
    def schema(self) -> dict | None:
        return None if self.schema_json is None else json.loads(self.schema_json)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\n{self.schema_json}".encode()).hexdigest()


TEXT = ResponseFormat("text")


@dataclass(frozen=True)
class ToolCall:
    """A forced tool call read back from the constrained answer."""

    name: str
    arguments: dict

    @property
    def arguments_json(self) -> str:
        """OpenAI's ``function.arguments`` is a JSON string; Ollama's is the object itself."""
        return json.dumps(self.arguments, ensure_ascii=False)


def from_openai_response_format(value: Any, *, param: str = "response_format",
                                limits: SchemaLimits = DEFAULT_SCHEMA_LIMITS) -> ResponseFormat:
    """OpenAI chat/completions ``response_format``: ``{"type": "text" | "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {"name", "strict", "schema", "description"}}``."""
    return _typed_format(value, param, limits, nested=True, example='{"type": "json_object"}')


def from_ollama_format(value: Any, *, param: str = "format",
                       limits: SchemaLimits = DEFAULT_SCHEMA_LIMITS) -> ResponseFormat:
    """Ollama ``format``: absent/``""`` (text), ``"json"`` (any JSON object) or a JSON schema object."""
    if value is None or value == "":
        return TEXT
    if value == "json":
        return _any_object(param)
    if isinstance(value, dict):
        return _schema_format(value, param, None, False, limits)
    raise FormatShapeError(f"{param} must be \"json\" or a JSON schema object, got {json.dumps(value)[:60]}",
                           param=param)


def from_responses_text_format(value: Any, *, param: str = "text.format",
                               limits: SchemaLimits = DEFAULT_SCHEMA_LIMITS) -> ResponseFormat:
    """The Responses API's ``text.format``: ``{"type": "text" | "json_object"}`` or
    ``{"type": "json_schema", "name", "schema", "strict", "description"}`` (flat, unlike chat)."""
    return _typed_format(value, param, limits, nested=False, example='{"type": "json_schema", ...}')


def _typed_format(value: Any, param: str, limits: SchemaLimits, *, nested: bool, example: str) -> ResponseFormat:
    """The ``{"type": ...}`` shapes of chat (``nested``: the schema's fields under ``json_schema``; a
    schema-less one is any JSON object) and of the Responses API (flat; the schema is required)."""
    if value is None:
        return TEXT
    if not isinstance(value, dict):
        raise FormatShapeError(f"{param} must be an object such as {example}", param=param)
    kind = value.get("type")
    if kind == "text":
        return TEXT
    if kind == "json_object":
        return _any_object(param)
    if kind == "json_schema":
        spec, where = (value.get("json_schema"), f"{param}.json_schema") if nested else (value, param)
        if not isinstance(spec, dict):
            raise FormatShapeError(f"{where} must be an object with name and schema", param=where)
        name = _name(spec.get("name"), f"{where}.name")
        strict = _flag(spec.get("strict"), f"{where}.strict")
        if "schema" not in spec:
            if nested:  # OpenAI: a schema-less json_schema is any JSON object
                return ResponseFormat("json_schema", _dump(_ANY_OBJECT), name, strict, param=where)
            raise FormatShapeError(f"{where}.schema is required for json_schema", param=f"{where}.schema")
        return _schema_format(spec["schema"], f"{where}.schema", name, strict, limits)
    raise FormatShapeError(f"{param}.type must be one of 'text', 'json_object', 'json_schema', got {kind!r}",
                           param=f"{param}.type")


def from_tool_choice(tool_choice: Any, tools: Any, *, param: str = "tool_choice", tools_param: str = "tools",
                     limits: SchemaLimits = DEFAULT_SCHEMA_LIMITS) -> ResponseFormat:
    """A forced call: ``"required"`` (any of ``tools``) or a named function (chat's
    ``{"type": "function", "function": {"name"}}`` or the Responses API's ``{"type": "function", "name"}``).
    ``"auto"``, ``"none"`` or absent: TEXT (the answer stays text, as today)."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return TEXT
    specs = _tools(tools, tools_param)
    if tool_choice == "required":
        chosen = specs
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        inner = tool_choice.get("function")
        where = f"{param}.function.name" if isinstance(inner, dict) else f"{param}.name"
        wanted = _name((inner or {}).get("name") if isinstance(inner, dict) else tool_choice.get("name"), where)
        chosen = [s for s in specs if s[0] == wanted]
        if not chosen:
            raise FormatShapeError(f"{where} is {wanted!r}, which is not among {tools_param} "
                                   f"({', '.join(s[0] for s in specs)})", param=where)
    else:
        raise FormatShapeError(f"{param} must be 'auto', 'none', 'required' or {{\"type\": \"function\", "
                               f"\"function\": {{\"name\": ...}}}}", param=param)
    branches = []
    for name, parameters, _strict, where in chosen:
        arguments = prepare_schema(parameters, param=where, limits=limits)
        branches.append({"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
                         "required": ["name", "arguments"], "additionalProperties": False})
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return ResponseFormat("tool_call", _dump(schema), None, any(s[2] for s in chosen),
                          tuple(s[0] for s in chosen), param=tools_param)


def tool_call_from_text(text: str) -> ToolCall:
    """The call a forced tool-call answer names (the text the grammar made the model write)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the tool-call answer is not complete JSON ({exc}): it was cut by max_tokens") from exc
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)
            and isinstance(value.get("arguments"), dict)):
        raise ValueError("the tool-call answer is not {\"name\": ..., \"arguments\": {...}}")
    return ToolCall(value["name"], value["arguments"])


def _any_object(param: str) -> ResponseFormat:
    return ResponseFormat("json_object", _dump(_ANY_OBJECT), param=param)


def _schema_format(schema: Any, param: str, name: str | None, strict: bool, limits: SchemaLimits) -> ResponseFormat:
    prepared = prepare_schema(schema, param=param, limits=limits)
    return ResponseFormat("json_schema", _dump(prepared), name, strict, param=param)


def _tools(tools: Any, param: str) -> list[tuple[str, Any, bool, str]]:
    """(name, parameters, strict, parameters' field) per tool; chat's nested and Responses' flat shape."""
    if not isinstance(tools, list) or not tools:
        raise FormatShapeError(f"{param} must be a non-empty array of functions when a tool call is forced",
                               param=param)
    specs = []
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise FormatShapeError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", param=where)
        fn, base = (tool["function"], f"{where}.function") if isinstance(tool.get("function"), dict) else (tool, where)
        name = _name(fn.get("name"), f"{base}.name")
        parameters = fn.get("parameters")
        if parameters is None:  # a function without parameters takes none
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        specs.append((name, parameters, _flag(fn.get("strict"), f"{base}.strict"), f"{base}.parameters"))
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise FormatShapeError(f"{param} names a function twice: each name must be unique", param=param)
    return specs


def _name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise FormatShapeError(f"{param} must be a name of 1 to 64 characters", param=param)
    return value


def _flag(value: Any, param: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FormatShapeError(f"{param} must be true or false", param=param)
    return value


def _dump(schema: Mapping | Sequence) -> str:
    # Key order is kept: the grammar writes properties in the schema's order, so it is part of the key.
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
