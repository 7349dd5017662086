"""The page at GET / in headless Chromium, driven through Selenium: a prompt typed and started, its greedy
continuation read back from the page as it streams, and nothing asked of any host but the server. Debian's
chromium and chromium-driver (.ci/run installs them); without them the test skips."""

import time
from pathlib import Path

import pytest
from test_serve import greedy, served  # noqa: F401  (the same tiny model behind a server, for this module)

from gptjax.inference.serve import batcher as batching

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PROMPT, MAX_TOKENS = "hello", 12  # greedily "oooooooooo" and two bytes that are not UTF-8


@pytest.fixture(scope="module")
def browser():
    """Chromium at a fixed path with its own chromedriver: given both, Selenium never runs Selenium Manager,
    which would otherwise look a driver up online."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            pytest.skip(f"{path} is absent: the page is tested in Debian's chromium and chromium-driver "
                        "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.mark.slow
def test_the_page_streams_the_greedy_continuation(browser, served, greedy, monkeypatch):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url, _ = served
    step = batching._step  # 30 ms a compiled call, so that the page shows the stream in several states
    monkeypatch.setattr(batching, "_step", lambda *a, **kw: (time.sleep(0.03), step(*a, **kw))[1])
    browser.get(url + "/")
    assert "://" not in browser.page_source  # no address of another host: no script, style or font from one

    def field(name):
        return browser.find_element(By.ID, name)

    WebDriverWait(browser, 10).until(lambda _: field("model").text == "tiny")  # v1/models answered the page
    browser.execute_script("""const out = document.getElementById("out"); window.seen = [];
      new MutationObserver(() => seen.push(out.textContent)).observe(out, {childList: true, characterData: true});""")
    field("prompt").send_keys(PROMPT)
    for name, value in (("temperature", "0"), ("max_tokens", str(MAX_TOKENS))):
        field(name).clear()
        field(name).send_keys(value)
    field("go").click()
    WebDriverWait(browser, 60).until(lambda _: field("out").get_attribute("data-state") == "done")
    expected = PROMPT + greedy(PROMPT, MAX_TOKENS)
    assert field("out").get_attribute("textContent") == expected
    seen = browser.execute_script("return seen")
    assert seen[-1] == expected and all(expected.startswith(s) for s in seen)
    assert len(set(seen)) >= 3, seen  # the prompt, some of the continuation, all of it: streamed, not at once
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(u.endswith("/v1/completions") for u in fetched)
    assert all(u.startswith(url + "/") for u in fetched + [browser.current_url]), fetched
