"""The web chat page in a real headless Chromium against the real server: a streamed answer appears,
Stop really cancels the generation on the server, and the page keeps working. Leaves a screenshot in
artifacts/web-chat.png."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"Chromium is not installed ({', '.join(missing)} missing; make system-deps installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1200,800",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=120.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def running(server) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith("q8chat_running "):
            return float(line.split()[1])
    raise AssertionError("no q8chat_running gauge")


def test_chat_stream_stop_and_continue(browser, server):
    from selenium.webdriver.common.by import By

    def find(css):
        return browser.find_element(By.CSS_SELECTOR, css)

    browser.get(server.base_url + "/")
    wait_for(lambda: find("#model").text == MODEL, 30)

    max_tokens = find("#max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("400")
    find("#prompt").send_keys("Tell me a long story about a dragon who learns to bake bread.")
    find("#send").click()

    def answer():
        return browser.find_elements(By.CSS_SELECTOR, ".message.assistant .content")[-1].text

    first = wait_for(lambda: len(answer()) > 20 and answer())
    wait_for(lambda: len(answer()) > len(first) + 20)  # it keeps streaming in
    assert not find("#stop").get_attribute("disabled") and find("#send").get_attribute("disabled")

    find("#stop").click()
    wait_for(lambda: not find("#send").get_attribute("disabled"), 10)
    wait_for(lambda: running(server) == 0, 10)  # the server stopped generating
    stopped = answer()
    time.sleep(1.0)
    assert answer() == stopped and len(stopped.split()) < 350

    find("#prompt").send_keys("Thanks! Now say goodbye in one short sentence.")
    find("#send").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2)
    wait_for(lambda: not find("#send").get_attribute("disabled"), 120)
    assert answer().strip()
    assert "tok/s" in find("#stats").text

    # JSON mode: the next answer is one JSON object (greedy: this small model then ends it at once)
    find("#new-chat").click()
    temperature = find("#temperature")
    temperature.clear()
    temperature.send_keys("0")
    find("#json-mode").click()
    find("#prompt").send_keys("Describe a cat.")  # without JSON mode: prose
    find("#send").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 1)
    wait_for(lambda: not find("#send").get_attribute("disabled"), 120)
    assert isinstance(json.loads(answer()), dict), answer()

    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "web-chat.png"))
