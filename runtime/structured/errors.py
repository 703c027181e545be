"""Typed errors of structured output. ``code`` is the error code the server answers with and
``param`` the request field at fault (OpenAI's error ``param``); every request-side refusal is a 400."""

from __future__ import annotations

from rksmolvlm.errors import RkSmolVLMError

__all__ = ["StructuredOutputError", "FormatShapeError", "InvalidSchemaError", "UnsupportedSchemaError",
           "SchemaTooComplexError", "TokenRejectedError"]


class StructuredOutputError(RkSmolVLMError):
    """Base of the structured-output refusals; the server maps each to HTTP 400 with ``code``/``param``."""

    code = "invalid_response_format"

    def __init__(self, message: str, *, param: str):
        super().__init__(message)
        self.param = param


class FormatShapeError(StructuredOutputError):
    """A ``response_format`` / ``format`` / ``text.format`` / ``tool_choice`` / ``tools`` of the wrong shape."""

    code = "invalid_response_format"


class InvalidSchemaError(StructuredOutputError):
    """A JSON schema that is not valid or cannot be satisfied (bad ``$ref``, unknown ``format``, bad regex …)."""

    code = "invalid_schema"


class UnsupportedSchemaError(StructuredOutputError):
    """A schema keyword the grammar cannot enforce; refused rather than silently dropped."""

    code = "unsupported_schema_keyword"

    def __init__(self, message: str, *, param: str, keyword: str):
        super().__init__(message, param=param)
        self.keyword = keyword


class SchemaTooComplexError(StructuredOutputError):
    """A schema over a size, depth, count or compile-effort limit (schemas are untrusted input)."""

    code = "schema_too_complex"

    def __init__(self, message: str, *, param: str, limit: str):
        super().__init__(message, param=param)
        self.limit = limit  # the SchemaLimits field (or llguidance limit) the schema is over


class TokenRejectedError(RkSmolVLMError):
    """A decoder tried to accept a token the grammar does not allow here: an engine bug, not a client error."""

    def __init__(self, message: str, *, token_id: int):
        super().__init__(message)
        self.token_id = token_id
