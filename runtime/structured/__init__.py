"""Structured output on the board (numpy + llguidance, no torch; DESIGN §10).

Request shapes become one ``ResponseFormat`` (formats.py: OpenAI ``response_format``, Ollama
``format``, Responses ``text.format``, forced tool calls), checked as untrusted input (schema.py),
compiled once per bundle and format into a ``Grammar`` (grammar.py), run per answer as a
``Constraint`` (constraint.py: mask / accept / forced / done), sampled on the CPU by the
``Sampler`` (sampler.py) and driven by a ``Guide`` (guide.py) that both engines call per step."""

from rksmolvlm.runtime.structured.constraint import Constraint
from rksmolvlm.runtime.structured.errors import (FormatShapeError, InvalidSchemaError, SchemaTooComplexError,
                                                 StructuredOutputError, TokenRejectedError, UnsupportedSchemaError)
from rksmolvlm.runtime.structured.formats import (TEXT, ResponseFormat, ToolCall, from_ollama_format,
                                                  from_openai_response_format, from_responses_text_format,
                                                  from_tool_choice, tool_call_from_text)
from rksmolvlm.runtime.structured.grammar import JSON_LAYOUT, CompileLimits, Grammar, GrammarCompiler
from rksmolvlm.runtime.structured.guide import Guide
from rksmolvlm.runtime.structured.sampler import Sampler, SamplingOptions, apply_penalties
from rksmolvlm.runtime.structured.schema import SchemaLimits, prepare_schema

__all__ = [
    # request formats
    "ResponseFormat", "ToolCall", "TEXT", "from_openai_response_format", "from_ollama_format",
    "from_responses_text_format", "from_tool_choice", "tool_call_from_text", "SchemaLimits", "prepare_schema",
    # grammars and decoding
    "GrammarCompiler", "Grammar", "CompileLimits", "JSON_LAYOUT", "Constraint", "Sampler", "SamplingOptions",
    "apply_penalties", "Guide",
    # errors
    "StructuredOutputError", "FormatShapeError", "InvalidSchemaError", "UnsupportedSchemaError",
    "SchemaTooComplexError", "TokenRejectedError",
]
