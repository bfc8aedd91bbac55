"""The chat page in a real headless browser (Debian's chromium, driven by Selenium)."""
from __future__ import annotations

import os

import openai
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# No first-run, sync, update or background traffic: the browser talks only to the test server.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,800"]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):  # .ci/run installs both; elsewhere say what is missing
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look anything up
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _ask(driver, question: str, image: str | None = None) -> str:
    """Fill the form, press Ask, wait for the streamed answer to finish; returns its text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, "#transcript .answer"))
    if image:
        driver.find_element(By.ID, "image").send_keys(image)
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src"))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "ask").click()
    answers = WebDriverWait(driver, 60).until(
        lambda d: (a := d.find_elements(By.CSS_SELECTOR, "#transcript .answer"))[before:]
        and a[-1].get_attribute("data-state") in ("done", "error") and a)
    assert answers[-1].get_attribute("data-state") == "done", answers[-1].get_attribute("textContent")
    return answers[-1].find_element(By.CLASS_NAME, "answer-text").get_attribute("textContent")


def test_upload_an_image_ask_and_see_the_streamed_answer(browser, served, data_url):
    browser.get(served["url"] + "/")
    image = served["images"][5]
    question = "what colour is the square?"
    shown = _ask(browser, question, image)
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question}]
    plain = client.chat.completions.create(model=served["model"], temperature=0,
                                           messages=[{"role": "user", "content": content}])
    expected = plain.choices[0].message.content
    assert shown and shown == expected
    # A follow-up question keeps the conversation (and its image) as history.
    follow_up = _ask(browser, "and the circle?")
    history = [{"role": "user", "content": content}, {"role": "assistant", "content": expected},
               {"role": "user", "content": "and the circle?"}]
    again = client.chat.completions.create(model=served["model"], temperature=0, messages=history)
    assert follow_up == again.choices[0].message.content

    # The page holds the whole conversation: both turns, oldest first, one under another, and
    # the picked image in the turn that asked about it.
    from selenium.webdriver.common.by import By

    turns = browser.find_elements(By.CSS_SELECTOR, "#transcript .turn")
    assert [t.get_attribute("class").split()[1] for t in turns] == ["user", "answer", "user", "answer"]
    texts = [t.find_element(By.CSS_SELECTOR, ".user-text, .answer-text").get_attribute("textContent") for t in turns]
    assert texts == [question, shown, "and the circle?", follow_up]
    tops = [t.rect["y"] for t in turns]
    assert tops == sorted(tops) and len(set(tops)) == 4
    images = [t.find_elements(By.TAG_NAME, "img") for t in turns]
    assert [len(i) for i in images] == [1, 0, 0, 0]
    assert images[0][0].get_attribute("src") == data_url(image)  # the file picked, as it was sent
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0][0]) > 0


def test_a_server_with_an_api_key_asks_for_it_once_and_answers(browser, served):
    import threading

    from selenium.webdriver.support.ui import WebDriverWait

    from paddle_mm.serving.server import ChatServer

    server = ChatServer(served["server"].engine, port=0, api_key="page-key")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(server.url + "/")
        prompt = WebDriverWait(browser, 10).until(lambda d: _alert(d))  # the 401 of /v1/models asks for the key
        prompt.send_keys("page-key")
        prompt.accept()
        WebDriverWait(browser, 10).until(lambda d: d.find_element("id", "model").text == "(tiny-vlm)")
        assert _ask(browser, "hello")  # the question carries the key too
    finally:
        server.shutdown()
        server.server_close()


def _alert(driver):
    try:
        return driver.switch_to.alert
    except Exception:  # noqa: BLE001 (no prompt yet)
        return None
