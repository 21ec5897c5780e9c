"""The playground at ``/`` in headless Chromium (Debian's ``chromium``, driven by Playwright):
a person picks prefixes, types one prompt, and gets each prefix's answer side by side."""

import os
import shutil

import pytest
from test_serve_api import BASE, KEY, build, folders  # noqa: F401 - folders is a fixture

from prefixtune.serve.background import BackgroundServer

CHROMIUM = os.environ.get("PREFIXTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless browser test needs Debian's chromium (apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the serve extra)")
    with sync_api.sync_playwright() as playwright:
        # root in a container has no user namespaces for Chromium's sandbox
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def running(folders):  # noqa: F811
    with BackgroundServer(build(folders)) as server:
        yield server


def test_playground_compares_prefixes_side_by_side(running, browser):
    import openai

    page = browser.new_page()
    page.goto(running.url + "/")
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")  # the model list needs the key
    page.wait_for_selector("#models input[value=beta]")
    boxes = page.locator("#models input")
    assert boxes.evaluate_all("bs => bs.map(b => b.value)") == [BASE, "alpha", "beta"]
    page.check("#models input[value=alpha]")
    page.check("#models input[value=beta]")
    page.uncheck(f"#models input[value='{BASE}']")
    page.fill("#prompt", "Write one line about the sea.")
    page.fill("#max_tokens", "10")
    page.fill("#temperature", "0")
    page.click("#compare")
    page.wait_for_function("document.querySelectorAll('.output[data-done]').length === 2", timeout=30_000)
    shown = {el.get_attribute("data-model"): el.locator(".text").inner_text()
             for el in page.locator(".output").all()}
    statuses = page.locator(".output .status").all_inner_texts()
    page.close()
    client = openai.OpenAI(base_url=running.url + "/v1", api_key=KEY, max_retries=0)
    for model in ("alpha", "beta"):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Write one line about the sea."}],
            max_tokens=10, temperature=0)
        assert shown[model].strip() == answer.choices[0].message.content.strip()  # innerText trims
    assert all(s.startswith("done") for s in statuses), statuses
    assert shown["alpha"] != shown["beta"]


def test_playground_shows_errors(running, browser):
    page = browser.new_page()
    page.goto(running.url + "/")
    # no key typed yet: the 401 is shown where the models would be
    page.wait_for_function("document.getElementById('models').textContent.includes('cannot list models')")
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")
    page.wait_for_selector("#models input[value=alpha]")
    page.click("#compare")
    assert page.inner_text("#message") == "Type a prompt."
    page.close()
