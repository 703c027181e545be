"""Structured output on the board (numpy + llguidance, no torch): request formats → one
ResponseFormat, compiled once per bundle and format into a Grammar, a per-answer Constraint
(mask / accept / forced / done) and a CPU Sampler both engines use. See DESIGN §10."""

from rksmolvlm.runtime.structured.constraint import Constraint
from rksmolvlm.runtime.structured.errors import (
                                                 FormatShapeError,
                                                 InvalidSchemaError,
                                                 SchemaTooComplexError,
                                                 StructuredOutputError,
                                                 TokenRejectedError,
                                                 UnsupportedSchemaError,
)
from rksmolvlm.runtime.structured.formats import (
                                                 TEXT,
                                                 ResponseFormat,
                                                 ToolCall,
                                                 from_ollama_format,
                                                 from_openai_response_format,
                                                 from_responses_text_format,
                                                 from_tool_choice,
                                                 tool_call_from_text,
)
from rksmolvlm.runtime.structured.grammar import (
                                                 JSON_LAYOUT,
                                                 CompileLimits,
                                                 Grammar,
                                                 GrammarCompiler,
)
from rksmolvlm.runtime.structured.sampler import (
                                                 Sampler,
                                                 SamplingOptions,
                                                 apply_penalties,
)
from rksmolvlm.runtime.structured.schema import SchemaLimits, prepare_schema

__all__ = ["Constraint", "FormatShapeError", "InvalidSchemaError", "SchemaTooComplexError", "StructuredOutputError",
           "TokenRejectedError", "UnsupportedSchemaError", "TEXT", "ResponseFormat", "ToolCall", "from_ollama_format",
           "from_openai_response_format", "from_responses_text_format", "from_tool_choice", "tool_call_from_text",
           "Sampler", "SamplingOptions", "apply_penalties", "SchemaLimits", "prepare_schema", "CompileLimits",
           "Grammar", "GrammarCompiler", "JSON_LAYOUT"]

