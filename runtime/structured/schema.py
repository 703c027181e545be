"""Checks an untrusted JSON schema before it reaches the grammar compiler: size, depth and count
limits, keywords the grammar cannot enforce (refused by name, never dropped), remote ``$ref``; and
closes objects: an object schema with ``properties`` and no ``additionalProperties`` gets
``additionalProperties: false``, strict or not. That is what llama.cpp's converter does (so what
Ollama's ``format`` gives), what OpenAI's strict mode requires, and every answer still validates
against the client's schema (a closed object is one of the open one's instances); it keeps a small
model from inventing keys after the ones it was asked for. ``additionalProperties: true`` or a
schema, ``patternProperties``, a bare ``{"type": "object"}`` and allOf members stay as sent."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rksmolvlm.runtime.structured.errors import (
    InvalidSchemaError,
    SchemaTooComplexError,
    UnsupportedSchemaError,
)

__all__ = ["SchemaLimits", "UNSUPPORTED_KEYWORDS", "prepare_schema", "pattern_size"]


@dataclass(frozen=True)
class SchemaLimits:
    """Bounds on a client's schema, checked in pure Python before compiling (bounded time and memory)."""

    max_bytes: int = 128 * 1024  # the schema as compact JSON
    max_depth: int = 48  # nested JSON containers (one schema level is about two)
    max_values: int = 20_000  # every JSON value in the schema, containers included
    max_properties: int = 1_000  # property names over all objects
    max_enum_values: int = 2_000  # enum members and consts over the schema
    max_pattern_length: int = 1_000  # characters of one ``pattern``
    max_pattern_size: int = 10_000  # a pattern's size with counted repetitions expanded ((a{100}){100} = 10,000)


DEFAULT_SCHEMA_LIMITS = SchemaLimits()


# Keywords that llguidance 1.9 refuses as unimplemented (checked one by one) plus the dynamic-scope
# family; the value is the fix the error message names. oneOf is left to llguidance: it compiles
# oneOf when it can prove the branches exclusive (different types, consts) and refuses it otherwise.
UNSUPPORTED_KEYWORDS: dict[str, str] = {
    "if": "express the condition with anyOf", "then": "express the condition with anyOf",
    "else": "express the condition with anyOf", "not": "list the allowed values or types instead",
    "dependentSchemas": "list the properties in required", "dependentRequired": "list the properties in required",
    "dependencies": "list the properties in required", "contains": "describe every item with items",
    "minContains": "describe every item with items", "maxContains": "describe every item with items",
    "unevaluatedProperties": "use additionalProperties", "unevaluatedItems": "use items: false after prefixItems",
    "propertyNames": "list the properties, or use patternProperties", "uniqueItems": "remove uniqueItems: true",
    "$dynamicRef": "use $ref", "$dynamicAnchor": "use $ref", "$recursiveRef": "use $ref",
    "$recursiveAnchor": "use $ref",
}

# Where a keyword holds subschemas: a map of them, one, or a list of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("additionalProperties", "additionalItems", "items", "contains", "not", "if", "then", "else",
               "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")


def prepare_schema(schema: Any, *, param: str, limits: SchemaLimits | None = None) -> dict:
    """The schema to compile: checked against ``limits`` and the unsupported keywords, with
    ``uniqueItems: false`` (no constraint) removed and objects with properties closed (see above).
    Raises a StructuredOutputError naming ``param`` and the keyword or limit."""
    if isinstance(schema, bool):
        raise InvalidSchemaError(f"{param} is the boolean schema {str(schema).lower()}: send an object schema "
                                 '(e.g. {"type": "object", ...})', param=param)
    if not isinstance(schema, dict):
        raise InvalidSchemaError(f"{param} must be a JSON schema object, got {type(schema).__name__}", param=param)
    limits = limits or DEFAULT_SCHEMA_LIMITS
    _check_shape(schema, param, limits)
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limits.max_bytes:
        raise SchemaTooComplexError(f"{param} is {size} bytes, over the limit of {limits.max_bytes}: send a smaller "
                                    "schema", param=param, limit="max_bytes")
    counts = {"properties": 0, "enum": 0}
    return _rewrite(schema, param, limits, counts, in_all_of=False)


def pattern_size(pattern: str) -> int:
    """An upper bound of a regex's size with counted repetitions expanded: what the lexer may have to
    build for it (``(a{1000}){1000}`` is a million states). Alternatives add, repetitions multiply."""
    frames: list[list[int]] = [[0, 0]]  # per open group: [size of closed alternatives, size of the current one]
    last = 0  # size of the atom a quantifier would apply to
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            if i <= n and pattern[i - 1] in "pPxu" and i < n and pattern[i] == "{":
                i = pattern.find("}", i) + 1 or n
            last = 1
            frames[-1][1] += 1
            continue
        if c == "[":
            i = _class_end(pattern, i)
            last = 1
            frames[-1][1] += 1
            continue
        if c == "(":
            frames.append([0, 0])
            last = 0
        elif c == ")" and len(frames) > 1:
            closed, current = frames.pop()
            last = closed + current
            frames[-1][1] += last
        elif c == "|":
            frames[-1][0] += frames[-1][1]
            frames[-1][1] = 0
            last = 0
        elif c == "{" and (m := _COUNTED.match(pattern, i)):
            low = int(m.group(1))
            high = int(m.group(3)) if m.group(3) else low
            factor = max(low, high, 1)
            frames[-1][1] += last * (factor - 1)
            last *= factor
            i = m.end()
            continue
        elif c not in "*+?^$":
            last = 1
            frames[-1][1] += 1
        i += 1
    return sum(closed + current for closed, current in frames)


_COUNTED = re.compile(r"\{(\d{1,9})(,(\d{0,9}))?\}")


def _class_end(pattern: str, start: int) -> int:
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _check_shape(schema: dict, param: str, limits: SchemaLimits) -> None:
    # Iterative, so a schema nested thousands deep is refused without touching Python's recursion limit.
    stack: list[tuple[Any, int]] = [(schema, 1)]
    values = 0
    while stack:
        node, depth = stack.pop()
        values += 1
        if values > limits.max_values:
            raise SchemaTooComplexError(f"{param} has more than {limits.max_values} values: send a smaller schema",
                                        param=param, limit="max_values")
        if isinstance(node, (dict, list)):
            if depth > limits.max_depth:
                raise SchemaTooComplexError(f"{param} is nested deeper than {limits.max_depth} levels: flatten the "
                                            "schema", param=param, limit="max_depth")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def _rewrite(node: Any, path: str, limits: SchemaLimits, counts: dict[str, int], in_all_of: bool) -> Any:
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        raise InvalidSchemaError(f"{path} must be a schema (an object or a boolean), got {type(node).__name__}",
                                 param=path)
    out = dict(node)
    if out.get("uniqueItems") is False:
        del out["uniqueItems"]  # no constraint at all
    for keyword, fix in UNSUPPORTED_KEYWORDS.items():
        if keyword in out:
            raise UnsupportedSchemaError(f"schema keyword '{keyword}' at {path} cannot be enforced while decoding: "
                                         f"{fix}", param=path, keyword=keyword)
    ref = out.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise UnsupportedSchemaError(f"'$ref' at {path} points outside the schema ({ref!r}): only local references "
                                     "(#/$defs/...) are resolved; inline the referenced schema", param=path,
                                     keyword="$ref")
    pattern = out.get("pattern")
    if isinstance(pattern, str):
        if len(pattern) > limits.max_pattern_length:
            raise SchemaTooComplexError(f"the pattern at {path} is {len(pattern)} characters, over the limit of "
                                        f"{limits.max_pattern_length}", param=path, limit="max_pattern_length")
        if (size := pattern_size(pattern)) > limits.max_pattern_size:
            raise SchemaTooComplexError(f"the pattern at {path} expands to about {size} positions, over the limit of "
                                        f"{limits.max_pattern_size}: use smaller repetition counts", param=path,
                                        limit="max_pattern_size")
    counts["enum"] += (len(out["enum"]) if isinstance(out.get("enum"), list) else 0) + ("const" in out)
    if counts["enum"] > limits.max_enum_values:
        raise SchemaTooComplexError(f"the schema has more than {limits.max_enum_values} enum/const values (at "
                                    f"{path})", param=path, limit="max_enum_values")
    for key in _SCHEMA_MAPS:
        members = out.get(key)
        if isinstance(members, dict):
            if key == "properties":
                counts["properties"] += len(members)
                if counts["properties"] > limits.max_properties:
                    raise SchemaTooComplexError(f"the schema has more than {limits.max_properties} properties (at "
                                                f"{path})", param=path, limit="max_properties")
            out[key] = {name: _rewrite(sub, f"{path}.{key}.{name}", limits, counts, False)
                        for name, sub in members.items()}
        elif members is not None:
            raise InvalidSchemaError(f"{path}.{key} must be an object of schemas", param=f"{path}.{key}")
    for key in _SCHEMA_ONE:
        if key in out:
            sub = out[key]
            if key == "items" and isinstance(sub, list):  # draft-07 tuple form
                out[key] = [_rewrite(s, f"{path}.items[{i}]", limits, counts, False) for i, s in enumerate(sub)]
            else:
                out[key] = _rewrite(sub, f"{path}.{key}", limits, counts, False)
    for key in _SCHEMA_LISTS:
        if key in out:
            members = out[key]
            if not isinstance(members, list) or not members:
                raise InvalidSchemaError(f"{path}.{key} must be a non-empty array of schemas", param=f"{path}.{key}")
            out[key] = [_rewrite(s, f"{path}.{key}[{i}]", limits, counts, key == "allOf")
                        for i, s in enumerate(members)]
    # allOf members stay open: closing each would make their union unsatisfiable.
    if not in_all_of and "properties" in out and "additionalProperties" not in out \
            and "patternProperties" not in out:
        out["additionalProperties"] = False
    # keywords sorted so equal schemas share a cache key; the properties keep their order (the answer's)
    return {key: out[key] for key in sorted(out)}
