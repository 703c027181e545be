"""The web page in a real browser (Debian's headless Chromium driven by selenium) against a real
server with an API key: the key prompt (401, a wrong key, then success), an uploaded image and a
question whose streamed answer equals the API's answer to the same request, a second turn, stop
(the server counts the aborted generation), an oversized image (the server's message is shown),
nothing refused by the page's Content-Security-Policy, and the layout at a phone's and a desktop's
size during a two-turn conversation with the trained demo model, whose answers are checked
(RKSMOLVLM_WRITE_SCREENSHOTS=1 writes docs/web-ui-phone.png and docs/web-ui-desktop.png).

Without chromium and chromedriver the module is skipped, unless CI is set (CI installs them)."""

import io
import os
import re
import struct
import time
import zlib
from pathlib import Path

import httpx
import openai
import pytest

from support import ROOT

from support.fakes import RecordingLlm

from support.images import rng_image
from rksmolvlm.runners import RUNNERS
from rksmolvlm.runtime.engines import EngineOptions
from rksmolvlm.runners import open_engines
from rksmolvlm.runtime.runner import Runner
from rksmolvlm.runtime.server import BackgroundServer, build_app
from rksmolvlm.runtime.server.config import ServerConfig, with_overrides

pytestmark = pytest.mark.slow  # drives headless Chromium over the demo model

MODEL = "idefics3-256m"
API_KEY = "browser-key-0123456789abcdef"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MAX_IMAGE_BYTES = 512 * 1024
CLIP = ROOT / "tests" / "data" / "video" / "h264_24fps_96x64.mp4"  # 3 s at 24 fps
WAIT_S = 30.0
DEMO_QUESTION, DEMO_ANSWERS = "What is on the table?", ["A coffee cup.", "There is no table."]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    if os.environ.get("CI"):
        pytest.fail("CI is set but Debian's chromium or chromium-driver is missing: .ci/run installs them "
                    "(apt-get install chromium chromium-driver)", pytrace=False)
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def served(preview_bundles, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(API_KEY + "\n")
    config = with_overrides(ServerConfig(), {
        "bundle": str(preview_bundles[MODEL]), "engine": "host", "verify_bundle": False,
        "server.api_key_file": str(key_file), "limits.max_image_bytes": MAX_IMAGE_BYTES,
        "limits.max_body_bytes": 2 * 1024 * 1024, "limits.max_image_pixels": 4_000_000})
    slow = {}

    def load(bundle):
        vision, llm = open_engines(bundle, "host", EngineOptions(max_new_tokens=config.limits.max_tokens))
        slow["llm"] = RecordingLlm(llm)
        return Runner(bundle, vision, slow["llm"], max_pixels=config.limits.max_image_pixels)

    with BackgroundServer(build_app(config, load=load), config) as server:
        server.llm = slow["llm"]
        yield server


@pytest.fixture(scope="module")
def api(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1280,800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A small drawn scene (sky, sun, hill), as a PNG file to upload."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (480, 320), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    for y in range(320):
        draw.line([(0, y), (480, y)], fill=(110 + y // 8, 160 + y // 10, 235 - y // 6))
    draw.ellipse([340, 40, 420, 120], fill=(250, 210, 70))
    draw.polygon([(0, 320), (0, 230), (150, 180), (300, 220), (480, 170), (480, 320)], fill=(70, 140, 70))
    path = tmp_path_factory.mktemp("upload") / "hill.png"
    image.save(path)
    return path


def wait(browser, condition, what: str, timeout: float = WAIT_S):
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}") from None


def text_of(element) -> str:
    return element.get_property("textContent")


def answers(browser) -> list:
    return browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")


def open_page(browser, served) -> None:
    """The page, with the key given if it asks (sessionStorage keeps it for the tab)."""
    browser.get(served.url + "/")
    model = browser.find_element(By.ID, "model")
    wait(browser, lambda d: MODEL in text_of(model) or d.find_element(By.ID, "keydialog").get_attribute("open"),
         "the model line or the key dialog")
    if browser.find_element(By.ID, "keydialog").get_attribute("open"):
        give_key(browser, API_KEY)
        wait(browser, lambda d: MODEL in text_of(model), "the model line")


def give_key(browser, key: str) -> None:
    field = browser.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    field.send_keys(Keys.ENTER)


def set_option(browser, element_id: str, value: str) -> None:
    details = browser.find_element(By.TAG_NAME, "details")
    if not details.get_attribute("open"):
        details.find_element(By.TAG_NAME, "summary").click()
    field = browser.find_element(By.ID, element_id)
    field.clear()
    if value:
        field.send_keys(value)


def ask(browser, question: str, image: Path | None = None, enter: bool = False) -> None:
    if image is not None:
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait(browser, lambda d: d.find_element(By.ID, "preview").is_displayed(), "the picked image's preview")
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    if enter:
        box.send_keys(Keys.ENTER)
    else:
        browser.find_element(By.ID, "send").click()


def finished_answer(browser, count: int):
    """The count-th answer once its stats line is shown (the stream has ended)."""
    wait(browser, lambda d: len(answers(d)) >= count and answers(d)[count - 1].find_elements(By.CLASS_NAME, "stats"),
         f"answer {count} to finish")
    return answers(browser)[count - 1]


def api_answer(api, messages: list[dict], max_tokens: int, model: str | None = MODEL) -> str:
    stream = api.chat.completions.create(model=model or api.models.list().data[0].id, messages=messages,
                                         max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def image_message(path: Path, text: str) -> dict:
    import base64

    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def metric(served, name: str, **labels) -> float:
    text = httpx.get(f"{served.url}/metrics").text
    selector = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    match = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def server_error(served, messages: list[dict]) -> dict:
    reply = httpx.post(f"{served.url}/v1/chat/completions", json={"model": MODEL, "messages": messages},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert reply.status_code >= 400
    return reply.json()["error"]


# -- the tests, in the order a visitor meets the page ------------------------------------------------
def test_the_key_prompt_shows_the_servers_401_and_takes_the_key(browser, served):
    missing = httpx.get(f"{served.url}/v1/models").json()["error"]["message"]
    invalid = httpx.get(f"{served.url}/v1/models", headers={"Authorization": "Bearer nope"}).json()["error"]["message"]
    browser.get(served.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    why = browser.find_element(By.ID, "keywhy")
    wait(browser, lambda d: d.find_element(By.ID, "keydialog").get_attribute("open") and text_of(why) == missing,
         "the key dialog with the server's missing-key message")
    give_key(browser, "not-the-key")
    wait(browser, lambda d: text_of(why) == invalid, "the server's invalid-key message")
    assert browser.find_element(By.ID, "keydialog").get_attribute("open")
    give_key(browser, API_KEY)
    model = browser.find_element(By.ID, "model")
    wait(browser, lambda d: MODEL in text_of(model), "the model line")
    assert "takes image" in text_of(model)
    assert browser.execute_script("return sessionStorage.getItem('rksmolvlm.api_key')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0  # kept in the tab only


def test_an_image_question_streams_the_apis_answer(browser, served, api, picture):
    open_page(browser, served)
    set_option(browser, "maxtokens", "12")
    ask(browser, "What is in the picture?", picture)
    answer = finished_answer(browser, 1)
    shown = text_of(answer.find_element(By.CLASS_NAME, "text"))
    expected = api_answer(api, [image_message(picture, "What is in the picture?")], 12)
    assert shown == expected and expected
    stats = text_of(answer.find_element(By.CLASS_NAME, "stats"))
    assert re.search(r"\d+ tiles · TTFT [\d,]+ ms · [\d.]+ tokens/s · \d+ prompt \+ 12 answer tokens", stats), stats
    assert browser.find_element(By.CSS_SELECTOR, ".turn.user img").get_attribute("src").startswith("blob:")
    assert not browser.find_element(By.ID, "preview").is_displayed()  # the composer is ready for the next turn


def test_a_second_turn_sends_the_whole_conversation(browser, served, api, picture):
    first = text_of(answers(browser)[0].find_element(By.CLASS_NAME, "text"))
    ask(browser, "And what colour is the sun?", enter=True)  # Enter sends
    answer = finished_answer(browser, 2)
    expected = api_answer(api, [image_message(picture, "What is in the picture?"),
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": [{"type": "text", "text": "And what colour is the sun?"}]}],
                          12)
    assert text_of(answer.find_element(By.CLASS_NAME, "text")) == expected


def test_stop_aborts_the_generation_on_the_server(browser, served):
    before = metric(served, "rksmolvlm_aborted_generations_total", reason="client_disconnect")
    served.llm.delay = 0.05  # 400 tokens would take 20 s
    try:
        set_option(browser, "maxtokens", "400")
        ask(browser, "Tell me a long story.")
        wait(browser, lambda d: len(answers(d)) == 3 and text_of(answers(d)[2]).strip() != "Answer",
             "the long answer to start streaming")
        browser.find_element(By.ID, "stop").click()
        answer = finished_answer(browser, 3)
        assert "stopped" in text_of(answer.find_element(By.CLASS_NAME, "stats"))
        deadline = time.monotonic() + 10
        while metric(served, "rksmolvlm_aborted_generations_total", reason="client_disconnect") != before + 1:
            assert time.monotonic() < deadline, "the server did not count the aborted generation"
            time.sleep(0.05)
        assert metric(served, "rksmolvlm_busy") == 0
    finally:
        served.llm.delay = 0.0
        set_option(browser, "maxtokens", "12")
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_enabled()


def _huge_png(width=30000, height=30000) -> bytes:
    """A 1-bit PNG of width×height: a few kB on the wire, 900 megapixels once decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_an_image_the_server_refuses_shows_the_servers_message(browser, served, tmp_path):
    browser.find_element(By.ID, "reset").click()
    assert not answers(browser)
    huge = tmp_path / "huge.png"
    huge.write_bytes(_huge_png())
    expected = server_error(served, [image_message(huge, "What is this?")])
    assert expected["code"] == "image_too_many_pixels"
    ask(browser, "What is this?", huge)
    error = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn .error"), "the error")[0]
    assert text_of(error) == expected["message"]
    # the refused turn is not kept: the question and the image stay in the composer, the next ask is clean
    assert browser.find_element(By.ID, "question").get_property("value") == "What is this?"
    assert browser.find_element(By.ID, "preview").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn.user")


def test_an_image_over_the_byte_limit_is_refused_before_upload(browser, served, tmp_path):
    big = tmp_path / "big.png"
    rng_image(900, 700, seed=1).save(big)
    size = big.stat().st_size
    assert size > MAX_IMAGE_BYTES
    requests = metric(served, "rksmolvlm_requests_total", path="/v1/chat/completions", status="413")
    browser.find_element(By.ID, "file").send_keys(str(big))
    notice = browser.find_element(By.ID, "notice")
    wait(browser, lambda d: notice.is_displayed(), "the notice")
    assert text_of(notice) == (f"big.png is {size:,} bytes, over limits.max_image_bytes = {MAX_IMAGE_BYTES:,}: send "
                               "a smaller image (downscale or compress it)")
    assert metric(served, "rksmolvlm_requests_total", path="/v1/chat/completions", status="413") == requests


def test_a_clip_to_a_model_without_video_is_refused_in_the_page(browser, served):
    browser.find_element(By.ID, "file").send_keys(str(CLIP))
    notice = browser.find_element(By.ID, "notice")
    wait(browser, lambda d: "takes no video" in text_of(notice), "the notice")
    assert text_of(notice).startswith(f"{CLIP.name} is a video: this server takes no video")
    assert not browser.find_element(By.ID, "clip").is_displayed()  # not picked (an earlier pick stays)
    assert CLIP.name not in text_of(browser.find_element(By.ID, "fileinfo"))


@pytest.fixture(scope="module")
def video_served(preview_bundles):
    """The tiny SmolVLM2 bundle, no key (the page is on: loopback)."""
    config = with_overrides(ServerConfig(), {"bundle": str(preview_bundles["smolvlm2"]), "engine": "host",
                                             "verify_bundle": False})
    with BackgroundServer(build_app(config, RUNNERS), config) as server:
        yield server


def test_a_clip_streams_the_apis_answer_with_its_frames(browser, video_served):
    import base64

    browser.get(video_served.url + "/")
    wait(browser, lambda d: "takes image and video" in text_of(d.find_element(By.ID, "model")), "the model line")
    set_option(browser, "maxtokens", "4")
    ask(browser, "What happens in the video?", CLIP)
    answer = finished_answer(browser, 1)
    api = openai.OpenAI(base_url=f"{video_served.url}/v1", api_key="unused", max_retries=0, timeout=60)
    url = "data:video/mp4;base64," + base64.b64encode(CLIP.read_bytes()).decode()
    expected = api_answer(api, [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                             {"type": "text", "text": "What happens in the video?"}]}],
                          4, model=None)
    assert text_of(answer.find_element(By.CLASS_NAME, "text")) == expected
    assert re.match(r"3 frames · ", text_of(answer.find_element(By.CLASS_NAME, "stats")))  # 3 s at 1 fps
    assert browser.find_element(By.CSS_SELECTOR, ".turn.user video").get_attribute("src").startswith("blob:")


@pytest.fixture(scope="module")
def demo_served(demo_preview_bundle):
    """The trained tiny demo model's bundle (built on first use, by this test only), no key."""
    config = with_overrides(ServerConfig(), {"bundle": str(demo_preview_bundle), "engine": "host",
                                             "verify_bundle": False})
    with BackgroundServer(build_app(config, RUNNERS), config) as server:
        yield server


def test_a_demo_conversation_at_phone_and_desktop_size_and_no_csp_violation(browser, demo_served, tmp_path):
    """Two turns with the trained demo model: the coffee photo and the cat photo, the same question,
    the trained answers shown; the screenshots of the README are this conversation."""
    from rksmolvlm.calibration.vision_set import shipped_images_dir

    browser.get(demo_served.url + "/")
    wait(browser, lambda d: "takes image" in text_of(d.find_element(By.ID, "model")), "the model line")
    for count, photo in enumerate(("photo_coffee_cup_table.jpg", "photo_cat_closeup_small.jpg"), 1):
        ask(browser, DEMO_QUESTION, shipped_images_dir() / photo)
        stats = text_of(finished_answer(browser, count).find_element(By.CLASS_NAME, "stats"))
        cached = r" · 1 image\(s\) from the cache" if count == 2 else ""  # the coffee photo's features are kept
        assert re.fullmatch(rf"5 tiles{cached} · TTFT [\d,]+ ms · [\d.]+ tokens/s · \d+ prompt \+ \d+ answer tokens",
                            stats), stats
    assert [text_of(a.find_element(By.CLASS_NAME, "text")) for a in answers(browser)] == DEMO_ANSWERS
    asked = browser.find_elements(By.CSS_SELECTOR, ".turn.user")
    assert [text_of(t.find_element(By.CLASS_NAME, "text")) for t in asked] == [DEMO_QUESTION] * 2
    assert all(t.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("blob:") for t in asked)
    write = os.environ.get("RKSMOLVLM_WRITE_SCREENSHOTS") == "1"
    for name, (width, height) in {"phone": (390, 844), "desktop": (1280, 800)}.items():
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": name == "phone"})
        wait(browser, lambda d, width=width: d.execute_script("return window.innerWidth") == width,
             f"the {name} width")
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page scrolls sideways by {overflow} px at {width} px"
        for control in ("question", "send", "stop"):
            box = browser.find_element(By.ID, control).rect
            assert box["x"] >= 0 and box["x"] + box["width"] <= width, f"#{control} is off the {name} screen"
        png = browser.get_screenshot_as_png()
        from PIL import Image

        assert Image.open(io.BytesIO(png)).size == (width, height)
        target = ROOT / "docs" / f"web-ui-{name}.png" if write else tmp_path / f"{name}.png"
        target.parent.mkdir(exist_ok=True)
        partial = target.with_suffix(".png.part")
        partial.write_bytes(png)
        partial.replace(target)
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    log = [entry["message"] for entry in browser.get_log("browser")]
    assert not [m for m in log if "Content Security Policy" in m or "Refused to" in m], log
