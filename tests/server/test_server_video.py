"""Video through the server (SmolVLM2): vLLM's ``video_url`` parts driven with the official openai client
against the real server on loopback (host-preview engines of the tiny SmolVLM2 bundle). A good clip as a
data: URI or a file under images.local_dir is answered with the same tokens and prompt count as
``Runner.generate`` with the same VideoPart (what ``rksmolvlm ask --video`` runs); per-request fps /
max_frames (in ``video_url`` or vLLM's ``mm_processor_kwargs``) change the frames and the prompt as the
direct runner says, and a max_frames above the checkpoint's limit is capped; every bad video of
tests/data/video gets its named 4xx before it may queue while /health keeps answering, then a good request
succeeds; /v1/models shows the video defaults and limits; an Idefics3 bundle answers a video with 400
video_not_supported; remote videos come through the hardened fetcher only when allowed."""

import base64
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from support import ROOT

from support.fakes import fake_runner

from support.net import LoopbackHandler, health_within_limit, loopback_http
from rksmolvlm.runners import RUNNERS
from rksmolvlm.processing.content import Message, TextPart, VideoPart
from rksmolvlm.runtime.engines import GenerationConfig
from rksmolvlm.runners import open_engines
from rksmolvlm.runtime.runner import Runner
from rksmolvlm.runtime.server import ApiError, BackgroundServer, RequestReader, ServedModel, build_app
from rksmolvlm.runtime.server.config import ConfigError, ServerConfig, with_overrides

CLIPS = ROOT / "tests" / "data" / "video"
SHORT = "h264_24fps_96x64.mp4"  # 3 s at 24 fps: 3 frames at the checkpoint's 1 fps
LONG = "h264_70s_25fps_64x48.mp4"  # 70 s at 25 fps: 70 frames wanted at 1 fps, so max_frames decides
MIB = 1024 * 1024
MAX_BYTES = 1 * MIB  # video.max_bytes of the served server: the oversized case stays small
QUESTION = "What happens in the video?"
TOKENS = 4


def clip(name: str) -> bytes:
    return (CLIPS / name).read_bytes()


def data_uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video_part(url: str, **sampling) -> dict:
    return {"type": "video_url", "video_url": {"url": url, **sampling}}


def ask(*parts, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def timings(reply) -> dict:
    return reply.model_extra["rksmolvlm"]["timings"]


def frames(reply) -> int:
    t = timings(reply)
    return t["video_frames"] + t["video_cached_frames"]


# -- servers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("local-media")
    shutil.copy(CLIPS / SHORT, path / SHORT)
    return path


@pytest.fixture(scope="module")
def served(preview_bundles, local_dir):
    """The tiny SmolVLM2 bundle on the host engines with the board's video defaults; local files under
    local_dir; remote URLs off (the default); video.max_bytes small so that the oversized case is cheap, and
    limits.max_body_bytes as small: the body limit must be raised to carry a video's data: URI."""
    config = with_overrides(ServerConfig(), {"bundle": str(preview_bundles["smolvlm2"]), "engine": "host",
                                             "images.local_dir": str(local_dir), "video.max_bytes": MAX_BYTES,
                                             "limits.max_body_bytes": MAX_BYTES,
                                             "limits.max_image_bytes": MAX_BYTES // 2})
    app = build_app(config, RUNNERS)
    with BackgroundServer(app, config) as server:
        server.service = app.state.service
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(runtime_bundles):
    """What ``rksmolvlm ask --video`` runs: a Runner of its own on the same bundle, default options."""
    bundle = runtime_bundles["smolvlm2"]
    runner = Runner(bundle, *open_engines(bundle, "host"))
    yield runner
    runner.close()


def direct_answer(direct, data: bytes, fps=None, max_frames=None):
    message = Message("user", (VideoPart(data, fps, max_frames), TextPart(QUESTION)))
    return direct.generate([message], GenerationConfig(max_new_tokens=TOKENS)).consume()


def good_request(client):
    reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hello?"}],
                                           max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


# -- good clips --------------------------------------------------------------------------------------
def test_a_clip_as_data_uri_is_answered_as_the_runner_answers_it(client, direct):
    data = clip(SHORT)
    reply = client.chat.completions.create(model="any", messages=ask(video_part(data_uri(data))), max_tokens=TOKENS)
    expected = direct_answer(direct, data)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    assert reply.model_extra["rksmolvlm"]["token_ids"] == expected.token_ids
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert frames(reply) == 3  # 3 s at the checkpoint's 1 fps
    text_only = client.chat.completions.create(model="any", messages=ask(), max_tokens=1).usage.prompt_tokens
    seq = direct.bundle.manifest.model.image_seq_len
    assert reply.usage.prompt_tokens > text_only + 3 * (seq + 2)  # each frame's block: wrappers, <global-img>, seq


def test_a_stream_carries_the_same_answer(client, direct):
    data = clip(SHORT)
    chunks = list(client.chat.completions.create(model="any", messages=ask(video_part(data_uri(data))),
                                                 max_tokens=TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    expected = direct_answer(direct, data)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_a_file_under_local_dir_and_a_file_url(client, direct, local_dir):
    expected = direct_answer(direct, clip(SHORT))
    for url in (str(local_dir / SHORT), (local_dir / SHORT).as_uri()):
        reply = client.chat.completions.create(model="any", messages=ask(video_part(url)), max_tokens=TOKENS)
        assert reply.model_extra["rksmolvlm"]["token_ids"] == expected.token_ids
        assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_a_generic_data_uri_type_is_read_from_the_bytes(client, direct):
    data = clip(SHORT)
    for mime in ("application/octet-stream", "video/quicktime"):
        reply = client.chat.completions.create(model="any", messages=ask(video_part(data_uri(data, mime))),
                                               max_tokens=TOKENS)
        assert reply.usage.prompt_tokens == direct_answer(direct, data).prompt_tokens


# -- sampling per request ----------------------------------------------------------------------------
def test_max_frames_and_fps_per_request_change_the_prompt_as_the_runner_says(client, direct):
    data = clip(LONG)
    url = data_uri(data)

    def prompt(part, **extra):
        reply = client.chat.completions.create(model="any", messages=ask(part), max_tokens=1, **extra)
        return reply.usage.prompt_tokens, frames(reply)

    default = prompt(video_part(url))
    assert default == (direct_answer(direct, data).prompt_tokens, 16)  # video.max_frames = 16 (board default)
    four = prompt(video_part(url, max_frames=4))
    assert four == (direct_answer(direct, data, max_frames=4).prompt_tokens, 4)
    per_frame = (default[0] - four[0]) / 12
    seq = direct.bundle.manifest.model.image_seq_len
    assert seq + 2 < per_frame < seq + 20  # a frame's block and its timestamp line
    # vLLM's mm_processor_kwargs: num_frames (or max_frames) for every video of the request
    assert prompt(video_part(url), extra_body={"mm_processor_kwargs": {"num_frames": 4}}) == four
    assert prompt(video_part(url), extra_body={"mm_processor_kwargs": {"max_frames": 4}}) == four
    # the part's own setting wins over the request's
    assert prompt(video_part(url, max_frames=4), extra_body={"mm_processor_kwargs": {"num_frames": 8}}) == four
    # fps: 0.1 frame a second of a 70 s clip is 7 frames
    tenth = prompt(video_part(url, fps=0.1))
    assert tenth == (direct_answer(direct, data, fps=0.1).prompt_tokens, 7)
    assert prompt(video_part(url), extra_body={"mm_processor_kwargs": {"fps": 0.1}}) == tenth


def test_max_frames_above_the_checkpoints_limit_is_capped(client, direct):
    data = clip(LONG)
    limit = direct.bundle.video_settings.max_frames  # 64 in the SmolVLM2 checkpoints
    capped = client.chat.completions.create(model="any", messages=ask(video_part(data_uri(data), max_frames=100_000)),
                                            max_tokens=1)
    assert frames(capped) == limit
    assert capped.usage.prompt_tokens == direct_answer(direct, data, max_frames=limit).prompt_tokens


def test_a_second_question_about_a_clip_reuses_its_frames(served, client):
    url = data_uri(clip(SHORT))
    client.chat.completions.create(model="any", messages=ask(video_part(url)), max_tokens=1)
    before = served.service.metrics.value("rksmolvlm_video_frames_total", source="cache")
    again = client.chat.completions.create(model="any", messages=ask(video_part(url), text="And then?"), max_tokens=1)
    assert timings(again)["video_cached_frames"] == 3 and timings(again)["video_frames"] == 0
    assert served.service.metrics.value("rksmolvlm_video_frames_total", source="cache") == before + 3
    assert 'rksmolvlm_video_frames_total{source="decoded"}' in httpx.get(f"{served.url}/metrics").text


@pytest.mark.parametrize("sampling, param", [
    ({"fps": 0}, "messages[0].content[0].video_url.fps"),
    ({"fps": -1}, "messages[0].content[0].video_url.fps"),
    ({"fps": 5000}, "messages[0].content[0].video_url.fps"),
    ({"fps": "fast"}, "messages[0].content[0].video_url.fps"),
    ({"fps": True}, "messages[0].content[0].video_url.fps"),
    ({"max_frames": 0}, "messages[0].content[0].video_url.max_frames"),
    ({"max_frames": 2.5}, "messages[0].content[0].video_url.max_frames"),
    ({"max_frames": "all"}, "messages[0].content[0].video_url.max_frames"),
])
def test_bad_sampling_in_the_part_is_a_named_400(served, sampling, param):
    body = {"messages": ask(video_part(data_uri(clip(SHORT)), **sampling))}
    error = post(served, body)[0]
    assert error["param"] == param and error["code"] in ("invalid_value", "invalid_type"), error


@pytest.mark.parametrize("kwargs, param, code", [
    ([1], "mm_processor_kwargs", "invalid_type"),
    ({"fps": 0}, "mm_processor_kwargs.fps", "invalid_value"),
    ({"num_frames": -3}, "mm_processor_kwargs.num_frames", "invalid_value"),
    ({"num_frames": 4, "max_frames": 8}, "mm_processor_kwargs.max_frames", "invalid_value"),
    ({"max_pixels": 1000}, "mm_processor_kwargs.max_pixels", "unsupported_parameter"),
])
def test_bad_mm_processor_kwargs_are_a_named_400(served, kwargs, param, code):
    error = post(served, {"messages": ask(video_part(data_uri(clip(SHORT)))), "mm_processor_kwargs": kwargs})[0]
    assert (error["param"], error["code"]) == (param, code), error


# -- bad videos: refused before the queue, /health answering throughout -------------------------------
class Watch:
    """/health probed every 10 ms from another thread while a request is handled."""

    def __init__(self, url: str):
        self.url, self.times, self.failures = url, [], []
        self._done = threading.Event()

    def __enter__(self) -> "Watch":
        self._client = httpx.Client(timeout=5)
        self._client.get(f"{self.url}/health")  # the connection is open before the request starts
        self._thread = threading.Thread(target=self._probe)
        self._thread.start()
        time.sleep(0.03)
        return self

    def __exit__(self, *exc):
        time.sleep(0.03)
        self._done.set()
        self._thread.join()
        self._client.close()

    def report(self) -> str:
        slow = [round(t * 1000) for t in self.times if t >= 0.1]
        return f"/health: {len(self.times)} probes, slowest {max(self.times) * 1000:.0f} ms, slow ones (ms) {slow}"

    def _probe(self):
        while not self._done.is_set():
            start = time.perf_counter()
            try:
                if self._client.get(f"{self.url}/health").status_code != 200:
                    self.failures.append("not 200")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.times.append(time.perf_counter() - start)
            time.sleep(0.01)


def post(server, body: dict, path: str = "/v1/chat/completions") -> tuple[dict, int, float]:
    start = time.perf_counter()
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    seconds = time.perf_counter() - start
    assert response.status_code >= 400, response.text[:300]
    assert "Traceback" not in response.text and len(response.text) < 2000
    return response.json()["error"], response.status_code, seconds


def file_part(name: str) -> dict:
    return video_part(data_uri(clip(name)))


BAD = {
    # case: (part maker, status, code, words in the message)
    "zero-length file": (lambda d: file_part("empty.mp4"), 400, "invalid_video", "empty"),
    "garbage bytes": (lambda d: file_part("garbage.mp4"), 400, "invalid_video", ""),
    "corrupt payload": (lambda d: file_part("corrupt_payload.mp4"), 400, "invalid_video", ""),
    "audio only": (lambda d: video_part(data_uri(clip("audio_only.m4a"), "video/mp4")), 400, "no_video_stream", ""),
    "subtitles only": (lambda d: file_part("subtitles_only.mp4"), 400, "no_video_stream", ""),
    "10-hour clip": (lambda d: file_part("h264_10h_32x32.mp4"), 400, "video_too_long",
                     "video.max_duration_seconds"),
    "2×100,000 frames": (lambda d: video_part(data_uri(clip("ffv1_2x100000.mkv"), "video/x-matroska")), 400,
                         "video_too_large", "video.max_"),
    "10-bit": (lambda d: file_part("h264_10bit_96x64.mp4"), 400, "unsupported_video", ""),
    "over video.max_bytes": (lambda d: video_part(data_uri(clip(SHORT) * (MAX_BYTES // len(clip(SHORT)) + 1))), 413,
                             "video_too_large", "video.max_bytes"),
    "a path outside local_dir": (lambda d: video_part(str(CLIPS / SHORT)), 400, "video_path_not_allowed",
                                 "images.local_dir"),
    "an escape from local_dir": (lambda d: video_part(f"{d}/../{SHORT}"), 400, "video_path_not_allowed", ""),
    "a remote URL (remote off)": (lambda d: video_part("http://127.0.0.1:9/clip.mp4"), 400,
                                  "remote_videos_disabled", "images.allow_remote"),
    "an image type": (lambda d: video_part(data_uri(clip(SHORT), "image/png")), 400, "unsupported_video_type",
                      "image_url"),
    "an ftp URL": (lambda d: video_part("ftp://example.com/a.mp4"), 400, "invalid_video_url", ""),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_video_gets_its_named_4xx_while_health_answers(served, client, local_dir, case, stream):
    make, status, code, words = BAD[case]
    body = {"messages": ask(make(local_dir)), "max_tokens": 2, "stream": stream}
    with Watch(served.url) as watch:
        error, got, seconds = post(served, body)
    assert (got, error["code"]) == (status, code), error
    assert words in error["message"] and error["param"].startswith("messages[0].content[0].video_url"), error
    assert seconds < 5, f"{case}: answered in {seconds:.2f} s"
    assert not watch.failures and health_within_limit(watch.times), watch.report()
    good_request(client)


def test_a_video_that_breaks_while_decoding_is_a_named_400_from_the_worker(served, client):
    """A truncated MP4 reads as a shorter clip (32 of its index's 72 frames) whose last frame cannot be
    decoded: found only when that frame is sampled (24 fps here), after the request has queued — a 400
    for a plain request, an error event for a stream."""
    part = video_part(data_uri(clip("truncated.mp4")), fps=24)
    with Watch(served.url) as watch:
        error, status, _ = post(served, {"messages": ask(part), "max_tokens": 2})
    assert (status, error["code"]) == (400, "invalid_video") and "could not be decoded" in error["message"], error
    assert not watch.failures and health_within_limit(watch.times), watch.report()
    with pytest.raises(openai.APIError) as info:
        list(client.chat.completions.create(model="any", messages=ask(part), max_tokens=2, stream=True))
    assert info.value.code == "invalid_video"
    good_request(client)


def test_a_good_video_after_the_bad_ones(client, direct):
    data = clip(SHORT)
    reply = client.chat.completions.create(model="any", messages=ask(video_part(data_uri(data))), max_tokens=TOKENS)
    assert reply.model_extra["rksmolvlm"]["token_ids"] == direct_answer(direct, data).token_ids


def test_the_body_limit_carries_a_video_of_max_bytes(served):
    """A data: URI of a video of video.max_bytes gets through the body limit: limits.max_body_bytes, raised
    for a model that takes video when it is smaller (an image-only config keeps its limit)."""
    small = with_overrides(ServerConfig(), {"limits.max_body_bytes": 2 * MIB, "limits.max_image_bytes": MIB,
                                            "video.max_bytes": 3 * MIB})
    assert small.body_limit(takes_video=False) == 2 * MIB
    body = json.dumps({"messages": ask(video_part(data_uri(b"v" * 3 * MIB)))})
    assert small.body_limit(takes_video=True) >= len(body)
    assert with_overrides(small, {"video.enabled": False}).body_limit(takes_video=True) == 2 * MIB
    assert ServerConfig().body_limit(takes_video=True) == ServerConfig().limits.max_body_bytes  # 14 MiB fits 20 MiB
    # the served server's limits.max_body_bytes = video.max_bytes: a data: URI of exactly video.max_bytes gets
    # through the raised body limit and reaches the video check (refused there as not a video)
    error, status, _ = post(served, {"messages": ask(video_part(data_uri(b"\0" * MAX_BYTES)))})
    assert (status, error["code"]) == (400, "invalid_video"), error
    error, status, _ = post(served, {"messages": ask(video_part(data_uri(b"\0" * 2 * MAX_BYTES)))})
    assert (status, error["code"]) == (413, "request_too_large") and "raised to carry one video" in error["message"]


@pytest.mark.parametrize("overrides, words", [
    ({"video.fps": float("nan")}, "video.fps must be a finite number"),
    ({"video.fps": 0}, "video.fps = 0.0 is out of range"),
    ({"video.max_frames": 0}, "video.max_frames = 0 is out of range"),
    ({"video.max_bytes": "lots"}, "is not a size"),
    ({"video.enabled": "yes"}, "video.enabled must be true or false"),
])
def test_the_video_section_is_validated(overrides, words):
    with pytest.raises(ConfigError, match=words):
        with_overrides(ServerConfig(), overrides)


def test_the_video_section_reaches_the_runner(served):
    import dataclasses

    from rksmolvlm.processing.video import VideoLimits
    from rksmolvlm.runtime.server.config import VIDEO_LIMIT_KEYS

    assert VIDEO_LIMIT_KEYS == tuple(f.name for f in dataclasses.fields(VideoLimits))  # every limit is a key
    options = served.service.runner.videos.options
    assert (options.fps, options.max_frames, options.cache_frames) == (None, 16, 256)
    assert options.limits == dataclasses.replace(ServerConfig().video.limits(), max_bytes=MAX_BYTES)
    assert options.limits.max_duration_seconds == 600 and options.limits.max_side == 4096


# -- what the server says ------------------------------------------------------------------------------
def test_models_show_the_video_defaults_and_limits(client, idefics):
    card = client.models.list().data[0].model_extra
    assert card["input_modalities"] == ["text", "image", "video"]
    video = card["rksmolvlm"]["video"]
    assert video["max_frames"] == 16 and video["fps"] == 1.0 and video["checkpoint_max_frames"] == 64
    assert video["max_bytes"] == MAX_BYTES and video["max_duration_seconds"] == 600
    assert card["rksmolvlm"]["images"]["max_images"] == 32
    other = httpx.get(f"{idefics.url}/v1/models").json()["data"][0]
    assert other["input_modalities"] == ["text", "image"] and other["rksmolvlm"]["video"] is None


# -- a model without video -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def idefics(preview_bundles):
    config = with_overrides(ServerConfig(), {"bundle": str(preview_bundles["idefics3-256m"]), "engine": "host"})
    with BackgroundServer(build_app(config, load=lambda b: fake_runner(b, [5])), config) as server:
        yield server


def test_a_video_to_a_model_without_video_is_a_named_400(idefics):
    error, status, _ = post(idefics, {"messages": ask(video_part(data_uri(clip(SHORT))))})
    assert (status, error["code"]) == (400, "video_not_supported") and "SmolVLM2" in error["message"], error
    assert error["param"] == "messages[0].content[0].video_url"


def test_the_ollama_api_has_no_video_field(served):
    """A video sent as an Ollama image is refused with a message saying where videos go."""
    response = httpx.post(f"{served.url}/api/chat", timeout=30, json={
        "model": "any", "stream": False,
        "messages": [{"role": "user", "content": "What happens?", "images": [base64.b64encode(clip(SHORT)).decode()]}]})
    assert response.status_code == 400
    message = response.json()["error"]
    assert "is a video" in message and "video_url" in message and "messages[0].images[0]" in message


# -- the reader on its own: switches and counts --------------------------------------------------------
def _reader(runtime_bundles, **overrides) -> RequestReader:
    model = ServedModel.from_bundle(runtime_bundles["smolvlm2"], None, "host")
    return RequestReader(with_overrides(ServerConfig(), overrides), model)


def test_video_disabled_and_too_many_videos(runtime_bundles):
    body = json.dumps({"messages": ask(video_part(data_uri(clip(SHORT))))}).encode()
    with pytest.raises(ApiError) as info:
        _reader(runtime_bundles, **{"video.enabled": False}).read(body)
    assert (info.value.status, info.value.code) == (400, "video_disabled")
    two = json.dumps({"messages": ask(video_part(data_uri(clip(SHORT))), video_part(data_uri(clip(SHORT))))}).encode()
    with pytest.raises(ApiError) as info:
        _reader(runtime_bundles).read(two)
    assert (info.value.code, info.value.param) == ("too_many_videos", "messages")
    assert "video.max_videos = 1" in info.value.message
    request = _reader(runtime_bundles, **{"video.max_videos": 2}).read(two)
    assert request.videos == 2 and request.video_bytes == 2 * len(clip(SHORT))


# -- remote videos (allowed), through the hardened fetcher ---------------------------------------------
class RemoteClips(LoopbackHandler):
    def do_GET(self):
        kinds = {"/clip.mp4": (clip(SHORT), "video/mp4"), "/page": (b"<p>not a video</p>", "text/html"),
                 "/to-clip": None}
        if self.path == "/to-clip":
            return self.redirect("/clip.mp4")
        body, kind = kinds.get(self.path) or (b"missing", "text/plain")
        return self.reply(200 if self.path in kinds else 404, body, kind)


@pytest.fixture(scope="module")
def remote():
    with loopback_http(RemoteClips) as base:
        yield base


def test_remote_videos_when_allowed(preview_bundles, remote):
    """Fake engines: what matters is the fetch (loopback reachable only with allow_private_networks)."""
    bundle = str(preview_bundles["smolvlm2"])
    config = with_overrides(ServerConfig(), {"bundle": bundle, "engine": "host", "images.allow_remote": True,
                                             "images.allow_private_networks": True, "images.remote_timeout_s": 2.0})
    with BackgroundServer(build_app(config, load=lambda b: fake_runner(b, [5])), config) as server:
        local = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        for path in ("/clip.mp4", "/to-clip"):
            reply = local.chat.completions.create(model="any", messages=ask(video_part(f"{remote}{path}")),
                                                  max_tokens=2)
            assert frames(reply) == 3
        for path, code in (("/page", "unsupported_video_type"), ("/missing", "video_fetch_failed")):
            error, status, _ = post(server, {"messages": ask(video_part(f"{remote}{path}"))})
            assert (status, error["code"]) == (400, code), error
    public = with_overrides(config, {"images.allow_private_networks": False})
    with BackgroundServer(build_app(public, load=lambda b: fake_runner(b, [5])), public) as server:
        error, status, _ = post(server, {"messages": ask(video_part(f"{remote}/clip.mp4"))})
        assert (status, error["code"]) == (400, "video_url_not_allowed")
        assert "images.allow_private_networks" in error["message"]
