"""The gateway's web page in a real headless Chromium (Debian's `chromium`, driven by Playwright) against
the gateway over the real tritonserver: an image and a prompt uploaded, the text streaming in, an image
placeholder then the decoded PNG, a second turn that sends the history back, Stop cancelling the Triton
request, and the error for a file that is not an image. Screenshots go to reports/browser/.

A server of this module's own: Stop cancels a gRPC stream, which the session server must never see.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from minigpt5_client.gateway.settings import GatewaySettings
from support.gateway import InProcessGateway, metric, picture
from support.servers import start_server

pytestmark = pytest.mark.server

CHROMIUM = os.environ.get("MINIGPT5_CHROMIUM", "/usr/bin/chromium")
REPORTS = Path(__file__).resolve().parents[2] / "reports" / "browser"
ANSWER_S = 120_000  # ms: an answer with a 2-step image on 2 busy CPU cores


@pytest.fixture(scope="module")
def triton(tiny_weights, tmp_path_factory):
    server = start_server(tiny_weights, tmp_path_factory.mktemp("triton-webpage"))
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def gateway(triton):
    with InProcessGateway(GatewaySettings(triton.grpc_url)) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the web page's tests need Debian's chromium "
            "(scripts/bootstrap.sh installs it: apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, gateway):
    context = browser.new_context(viewport={"width": 900, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(gateway.url + "/")
    page.wait_for_function("document.querySelector('#model option') !== null")
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


# Records, in the page, the answer's text length at every change of its text (each delta appended: a
# browser may draw several at once when they arrive together) and of its elements (placeholder, image).
WATCH = """() => {
  window.seen = [];
  const record = () => {
    const answers = document.querySelectorAll('.turn.assistant');
    const last = answers[answers.length - 1];
    if (!last) return;
    const body = last.querySelector('.body');
    const text = [...body.childNodes].filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.data).join('');
    window.seen.push({text: text.length,
                      placeholder: !!body.querySelector('.placeholder'), image: !!body.querySelector('img')});
  };
  const appendData = Text.prototype.appendData;
  Text.prototype.appendData = function (data) { appendData.call(this, data); record(); };
  new MutationObserver(record).observe(document.getElementById('log'), {subtree: true, childList: true});
}"""


def settings(page, **values):
    page.click("#settings summary")
    for field, value in values.items():
        if field == "force-image":
            page.check("#force-image")
        else:
            page.fill(f"#{field}", str(value))
    page.click("#settings summary")


def send(page, text):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_upload_stream_image_and_a_second_turn(page, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(picture())
    page.set_input_files("#files", str(photo))
    page.wait_for_selector(".preview img")
    settings(page, **{"force-image": True, "steps": 2, "max-tokens": 24, "seed": 7})
    bodies = []
    page.on(
        "request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None
    )
    page.evaluate(WATCH)
    send(page, "Tell a short story about this picture.")
    page.wait_for_function(
        "document.querySelector('.turn.assistant .meta').textContent.includes('seed')", timeout=ANSWER_S
    )
    seen = page.evaluate("window.seen")
    lengths = [s["text"] for s in seen]
    assert len({n for n in lengths if n > 0}) > 1 and lengths == sorted(lengths), "the text did not stream in"
    first_placeholder = next(i for i, s in enumerate(seen) if s["placeholder"])
    first_image = next(i for i, s in enumerate(seen) if s["image"])
    assert first_placeholder < first_image and not seen[-1]["placeholder"]  # the image took its place
    img = page.locator(".turn.assistant .body img.generated")
    assert img.count() == 1
    width, src = img.evaluate("i => [i.naturalWidth, i.src.slice(0, 22)]")
    assert width > 0 and src == "data:image/png;base64,"
    meta = page.inner_text(".turn.assistant .meta")
    assert "seed 7" in meta and "completion tokens" in meta
    (request,) = bodies
    assert request["stream"] and request["num_inference_steps"] == 2 and request["force_image"]
    assert request["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    REPORTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(REPORTS / "first-answer.png"), full_page=True)

    page.click("#settings summary")
    page.uncheck("#force-image")
    page.click("#settings summary")
    send(page, "And then?")
    page.wait_for_function(
        "document.querySelectorAll('.turn.assistant .meta')[1]?.textContent.includes('seed')", timeout=ANSWER_S
    )
    history = bodies[1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["images"][0]["image_url"]["url"] == page.evaluate(
        "document.querySelector('img.generated').src"
    )  # the generated image is fed back
    assert page.locator(".turn.assistant").count() == 2 and page.locator(".turn.user").count() == 2
    assert page.inner_text(".turn.assistant .body >> nth=1").strip()


def test_stop_cancels_the_request_on_the_server(page, triton):
    # Greedy without repetition penalty the tiny weights never stop (tests/server/test_gateway.py): a long answer
    # to stop. The page has no control for those two, so they are added to its request on the way out.
    def longer(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "temperature": 0.0, "repetition_penalty": 1.0}))

    page.route("**/v1/chat/completions", longer)
    settings(page, **{"max-tokens": 900})
    send(page, "A very long story.")
    page.wait_for_function("document.querySelector('.turn.assistant .body')?.textContent.length > 20", timeout=ANSWER_S)
    assert metric(triton, "minigpt5_inflight_requests", model="minigpt5") == 1
    page.click("#stop")
    page.wait_for_function("document.querySelector('.turn.assistant .meta').textContent.includes('stopped')")
    deadline = time.monotonic() + 20
    while metric(triton, "minigpt5_inflight_requests", model="minigpt5") > 0:
        assert time.monotonic() < deadline, f"the Triton request was not cancelled\n{triton.log_tail(20)}"
        time.sleep(0.1)
    assert len(page.inner_text(".turn.assistant .body")) > 20  # what arrived is kept
    assert page.is_visible("#regenerate") and page.is_enabled("#send")


def test_a_file_that_is_not_an_image_is_refused_in_the_page(page):
    page.set_input_files("#files", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture"}])
    page.wait_for_selector("#notice:not([hidden])")
    assert "notes.txt is not an image" in page.inner_text("#notice")
    assert page.locator(".preview").count() == 0
    REPORTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(REPORTS / "error.png"), full_page=True)
