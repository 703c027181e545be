"""The OpenAI adapter: ``POST /v1/chat/completions`` (``stream: true`` → server-sent events),
``GET /v1/models``, ``GET /v1/models/{id}`` and llama.cpp's ``GET /props``, over the Gateway
(``runtime/server/exchange.py``). A body is read by the RequestReader as it comes; an answer is
OpenAI's ``chat.completion`` object or its ``chat.completion.chunk`` stream, with usage and the
``rksmolvlm`` field (token ids, timings). Errors are OpenAI's ``{"error": {…}}`` (the app's handler).

Structured output: the reader compiles ``response_format`` (json_schema, json_object) or a forced tool
call into the request's grammar; a json answer is ordinary ``content`` (streamed as deltas). A forced
call's answer (``{"name", "arguments"}``, written under the grammar) is returned as OpenAI's
``message.tool_calls`` with ``finish_reason: "tool_calls"``; streamed, its text is held back and sent as
one ``tool_calls`` delta. Cut by max_tokens it cannot be a call: the partial text is the content and
the finish reason ``"length"``, as for any answer.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Iterable

from rksmolvlm import __version__
from rksmolvlm.runtime.server.config import VIDEO_LIMIT_KEYS
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.exchange import Gateway
from rksmolvlm.runtime.server.requests import ChatRequest

if TYPE_CHECKING:
    from rksmolvlm.runtime.server.service import Answer

__all__ = ["FINGERPRINT", "OpenAiApi"]

FINGERPRINT = f"rksmolvlm-{__version__}"  # system_fingerprint and llama.cpp's build_info


class OpenAiApi:
    """The OpenAI endpoints over one Gateway."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.service = gateway.service
        self.config = gateway.config
        self.model = gateway.model

    def routes(self) -> list:
        from starlette.routing import Route

        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.retrieve_model, methods=["GET"]),
            Route("/props", self.props, methods=["GET"]),  # llama.cpp's server properties (Frigate reads them)
        ]

    # -- generation ------------------------------------------------------------------------------
    async def chat_completions(self, request):
        from starlette.responses import JSONResponse, Response

        gateway = self.gateway
        request_id = request.scope["state"]["request_id"]
        chat = await gateway.admit(request, gateway.reader.read)
        if chat is None:
            return Response(status_code=499)
        exchange = gateway.enqueue(request, chat)
        if chat.stream:  # the role chunk goes out now: queue wait and prefill do not eat the client's first-byte
            # timeout; what fails after this point (context, image, 504, 503) is an error event in the stream
            return gateway.stream(request, exchange, _ChunkFrames(self.model.id, request_id, chat),
                                  {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await gateway.complete(request, exchange)
        if answer is None:
            return Response(status_code=499)
        return JSONResponse(_completion(answer, request_id, self.model.id, chat))

    # -- the model -------------------------------------------------------------------------------
    async def models(self, request):
        from starlette.responses import JSONResponse

        self.gateway.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request):
        from starlette.responses import JSONResponse

        self.gateway.authorize(request)
        if self.config.server.strict_model_name and request.path_params["model_id"] not in self.model.names:
            raise ApiError(404, f"the model {request.path_params['model_id'][:64]!r} is not served here: use "
                           f"{self.model.id!r}", "model_not_found", "model")
        return JSONResponse(self._model_card())  # a one-model server answers any name with its model

    async def props(self, request):
        """What llama.cpp's server reports at GET /props, in its field names: the context, one slot,
        the modalities and the defaults a request gets."""
        from starlette.responses import JSONResponse

        self.gateway.authorize(request)
        limits, context = self.config.limits, self.model.max_context
        # llama.cpp's n_predict -1: until the context ends
        n_predict = limits.default_max_tokens or (limits.max_tokens if limits.max_tokens < context else -1)
        params = {"n_predict": n_predict, "max_tokens": n_predict, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                  "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop": []}
        return JSONResponse({
            "default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": context, "speculative": False,
                                            "is_processing": bool(self.service.snapshot()["running"]),
                                            "params": params},
            "total_slots": 1, "model_path": self.model.id, "model_alias": self.model.id, "chat_template": "",
            "chat_template_caps": {"supports_tools": False, "supports_tool_calls": False},
            "modalities": {"vision": "image" in self._input_modalities(), "audio": False},
            "build_info": FINGERPRINT, "is_sleeping": False})

    def _input_modalities(self) -> list[str]:
        vision = self.model.details.get("vision_dtype") is not None
        images = ["image"] if vision and self.config.limits.max_images > 0 else []
        return ["text", *images, *(["video"] if vision and self.gateway.takes_video() else [])]

    def _media_limits(self) -> dict:
        """What a client may send besides text: the image limits and, for a model that takes video, the
        video sampling defaults (the request's own fps/max_frames win; max_frames at most the checkpoint's)
        and limits."""
        limits, video = self.config.limits, self.config.video
        images = {"max_images": limits.max_images, "max_image_bytes": limits.max_image_bytes,
                  "max_image_pixels": limits.max_image_pixels, "max_body_bytes": limits.max_body_bytes}
        checkpoint = self.model.video
        if checkpoint is None or not self.gateway.takes_video():
            return {"images": images, "video": None}
        return {"images": images, "video": {
            "fps": video.fps if video.fps is not None else checkpoint["fps"],
            "max_frames": min(video.max_frames, checkpoint["max_frames"]),
            "checkpoint_max_frames": checkpoint["max_frames"], "max_videos": video.max_videos,
            **{name: getattr(video, name) for name in VIDEO_LIMIT_KEYS}}}

    def _supported_parameters(self) -> list[str]:
        """The request fields /v1/chat/completions honours, in OpenRouter's ``supported_parameters`` terms;
        the structured ones only when the bundle's grammar compiler was built."""
        structured = ["response_format", "structured_outputs", "tools", "tool_choice"] \
            if self.gateway.grammars is not None else []
        return [*_PARAMETERS, *structured]

    def _model_card(self) -> dict:
        """OpenAI's model object plus what clients look for: the context (vLLM's max_model_len,
        context_length, llama.cpp's meta.n_ctx), the input modalities (top level and OpenRouter's /
        llama.cpp's architecture object) and the request parameters honoured (OpenRouter's
        supported_parameters: structured output among them)."""
        context, inputs = self.model.max_context, self._input_modalities()
        return {"id": self.model.id, "object": "model", "created": self.model.created, "owned_by": "rksmolvlm",
                "max_model_len": context, "context_length": context, "input_modalities": inputs,
                "output_modalities": ["text"], "supported_parameters": self._supported_parameters(),
                "architecture": {"input_modalities": inputs, "output_modalities": ["text"]},
                "meta": {"n_ctx": context}, "aliases": list(self.model.aliases),
                "rksmolvlm": {**self.model.details, "aliases": list(self.model.aliases), **self._media_limits()}}


# ==============================================================================================
# Private helpers
# ==============================================================================================
class _ChunkFrames:
    """A chat completion's server-sent events: the role chunk, content deltas, the finish chunk with
    usage (or OpenAI's include_usage form: a last chunk with no choices), then ``[DONE]``."""

    def __init__(self, model_id: str, request_id: str, chat: ChatRequest):
        self.include_usage = chat.include_usage
        self.tool_call = chat.tool_call
        self.held: list[str] = []  # a forced tool call's text, held back until it is complete
        self.base = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model_id, "system_fingerprint": FINGERPRINT}

    def opening(self) -> bytes:
        return self._chunk({"role": "assistant", "content": None if self.tool_call else ""})

    def delta(self, text: str) -> bytes:
        if self.tool_call:
            self.held.append(text)
            return b""
        return self._chunk({"content": text})

    def done(self, answer: Answer) -> Iterable[bytes]:
        usage = _usage(answer)
        finish = answer.finish_reason
        if self.tool_call:
            call = _tool_call(answer)
            if call is not None:  # OpenAI's shape: the call (id, name, arguments) in one delta, then the finish
                yield self._chunk({"tool_calls": [{"index": 0, **call}]})
                finish = "tool_calls"
            elif self.held:  # cut before the call was complete: the partial text, as content
                yield self._chunk({"content": "".join(self.held)})
        if self.include_usage:
            yield self._chunk({}, finish)
            yield _sse_data({**self.base, "choices": [], "usage": usage, "rksmolvlm": answer.extra()})
        else:
            yield self._chunk({}, finish, usage=usage, rksmolvlm=answer.extra())
        yield _DONE

    def error(self, error: ApiError) -> Iterable[bytes]:
        yield _sse_data(error.body())
        if error.code == "shutting_down":  # the server stops: the stream still ends as streams do
            yield _DONE

    def _chunk(self, delta: dict, finish: str | None = None, **extra) -> bytes:
        body = {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return _sse_data(body)


_DONE = b"data: [DONE]\n\n"
# What /v1/chat/completions honours besides the structured-output fields (OpenRouter's names).
_PARAMETERS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
               "frequency_penalty", "presence_penalty", "stream", "stream_options")


def _usage(answer: Answer) -> dict:
    completion = len(answer.token_ids)
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
            "total_tokens": answer.prompt_tokens + completion}


def _tool_call(answer: Answer) -> dict | None:
    """A forced call's answer as OpenAI's tool call (arguments as JSON text); None when it was cut short."""
    from rksmolvlm.runtime.structured import tool_call_from_text

    if answer.finish_reason != "stop":
        return None
    try:
        call = tool_call_from_text(answer.text)
    except ValueError:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json}}


def _completion(answer: Answer, request_id: str, model_id: str, chat: ChatRequest) -> dict:
    message: dict = {"role": "assistant", "content": answer.text}
    finish = answer.finish_reason
    call = _tool_call(answer) if chat.tool_call else None
    if call is not None:
        message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(answer), "rksmolvlm": answer.extra()}


def _sse_data(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
