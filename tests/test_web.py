"""The chat page in a real headless browser: Debian's chromium, driven by selenium through Debian's
chromedriver (no browser download)."""

import os
import shutil
import time

import openai
import pytest

from .serve_support import MODEL, live_server, make_served_checkpoint

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with live_server(make_served_checkpoint(tmp_path_factory.mktemp("web"))) as (srv, engine):
        yield srv, engine


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, seconds: float = 120, what: str = "the page"):
    """Poll `condition()` until it is truthy (bounded)."""
    for _ in range(int(seconds / 0.05)):
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def set_value(driver, element_id: str, value) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, str(value))


def test_typed_message_gets_a_streamed_reply(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    srv, _ = served
    browser.get(srv.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "model").text == MODEL, what="the model name")
    set_value(browser, "temperature", 0)
    set_value(browser, "max-tokens", 40)
    browser.find_element(By.ID, "system").send_keys("You answer questions about Python.")
    # count how often the reply's text changes while it streams in
    browser.execute_script("""
        window.changes = 0;
        new MutationObserver(() => { window.changes += 1; })
            .observe(document.getElementById('messages'), {subtree: true, characterData: true, childList: true});
    """)
    box = browser.find_element(By.ID, "input")
    box.send_keys("What does the for statement do?")
    box.send_keys(Keys.ENTER)
    done = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"), what="the reply")
    reply = done[0].find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")
    expected = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model=MODEL, temperature=0, top_p=0.95, max_tokens=40,
        messages=[{"role": "system", "content": "You answer questions about Python."},
                  {"role": "user", "content": "What does the for statement do?"}]).choices[0].message.content
    assert reply == expected and reply.strip()
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user .content").text == "What does the for statement do?"
    assert browser.execute_script("return window.changes") > 3  # it arrived piece by piece
    meta = done[0].find_element(By.CSS_SELECTOR, ".meta").text
    assert "tokens/s" in meta and "first token" in meta
    shot = os.environ.get("SAKIMI_CHAT_SCREENSHOT")  # the README's picture: see the Serving section
    if shot:
        browser.save_screenshot(shot)


def test_stop_button_ends_the_stream_and_frees_the_slot(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    import httpx2 as httpx

    srv, _ = served
    browser.get(srv.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "model").text == MODEL, what="the model name")
    set_value(browser, "max-tokens", 3500)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Tell me everything about classes.")
    box.send_keys(Keys.ENTER)
    wait_for(lambda: len(browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content")
                         .get_attribute("textContent")) > 10, what="some streamed text")
    assert browser.find_element(By.ID, "send").text == "Stop"
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: "stopped" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text,
             what="the stop")
    assert browser.find_element(By.ID, "send").text == "Send"
    wait_for(lambda: httpx.get(srv.url + "/health", timeout=10).json()["active"] == 0, what="the slot to be freed")
