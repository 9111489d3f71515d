"""ccj-serve's page in a real browser: the ``ccj-serve`` command started on a free loopback port,
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, installed here when missing and
apt-get can) driven by selenium. Typing a Chinese query shows the thumbnails of ``ccj-embed
query``'s ids in order; picking a file and dropping an image show its neighbours, itself first; a
phone-width window does not scroll sideways. ``CCJ_SERVE_SCREENSHOT=docs/serving.png`` saves the
screenshot the guide shows."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from _makers import REPO, free_port
from _serve_corpus import build

from chinese_clip_jax.embed import cli as embed_cli

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
webdriver = pytest.importorskip("selenium.webdriver")

APT = ["chromium", "chromium-driver", "fonts-wqy-microhei"]  # the font: Chinese in screenshots

pytestmark = pytest.mark.slow  # a model load and warm-up in a subprocess, and a browser: ~30 s


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; installs Debian's packages when missing (root + apt-get),
    else skips naming what is missing."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"no chromium/chromedriver and cannot install them (apt-get install -y {' '.join(APT)} as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            pytest.skip(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip(f"apt-get installed {APT} but chromium/chromedriver are still not on PATH")
    return found


@pytest.fixture(scope="module")
def page_corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("serve_browser"))


@pytest.fixture(scope="module")
def server(page_corpus):
    """``python -m chinese_clip_jax.serve`` on 127.0.0.1:<free port>; yields (url, start-up lines)."""
    port = free_port()
    cmd = [sys.executable, "-m", "chinese_clip_jax.serve", "--embeddings", str(page_corpus["out"]), "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd + ["--max-batch", "4"], env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.time() + 300
        while not (lines and "listening on" in lines[-1]):
            line = proc.stderr.readline()
            assert line and time.time() < deadline, f"ccj-serve did not start: {''.join(lines)[-3000:]}"
            lines.append(line)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):  # the socket opens right after the line
            try:
                urllib.request.urlopen(url + "/healthz", timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)
        yield url, lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = _browser()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900", "--lang=zh-CN"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.1)
    status = driver.execute_script("return document.getElementById('status').textContent")
    raise AssertionError(f"timed out waiting for {what}; the page says {status!r}")


SHOWN = """
const items = [...document.querySelectorAll('#results li')];
if (items.length !== arguments[0]) return null;
const imgs = items.map(li => li.querySelector('img'));
if (!imgs.every(img => img && img.complete && img.naturalWidth > 0)) return null;
return items.map(li => li.dataset.id);
"""


def _shown(driver, n: int, what: str) -> list[str]:
    """The ids of the ``n`` results once every thumbnail has loaded (``_clear`` first)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        ids = driver.execute_script(SHOWN, n)
        if ids:
            return ids
        time.sleep(0.1)
    raise AssertionError(f"{what}: {n} loaded thumbnails never appeared")


def _clear(driver) -> None:
    driver.execute_script("document.getElementById('results').replaceChildren()")


def test_page_in_chromium(server, page_corpus, browser, capsys):
    url, lines = server
    started = "".join(lines)
    assert f"model: {page_corpus['model']}" in started and "images: 300 rows" in started and "IndexFlatIP" in started

    browser.get(url + "/")
    _wait(browser, "return document.body.dataset.ready", "the page to load /healthz")
    assert str(page_corpus["model"]) in browser.find_element("id", "model").text

    # type a Chinese query: the thumbnails of ccj-embed query's ids, in order, with their scores
    q = "海边的日落"
    assert embed_cli.main(["query", str(page_corpus["out"]), "--text", q, "-k", "8"]) == 0
    want = json.loads(capsys.readouterr().out.splitlines()[0])["hits"]
    box = browser.find_element("id", "q")
    box.send_keys(q)
    k = browser.find_element("id", "k")
    k.clear()
    k.send_keys("8")
    browser.find_element("css selector", "#search button").click()
    assert _shown(browser, 8, "text search") == [h["id"] for h in want]
    scores = browser.execute_script("return [...document.querySelectorAll('#results .score')].map(e => e.textContent)")
    assert scores == [f"{h['score']:.4f}" for h in want]
    shot = browser.get_screenshot_as_png()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CCJ_SERVE_SCREENSHOT"):
        with open(os.environ["CCJ_SERVE_SCREENSHOT"], "wb") as f:
            f.write(shot)

    # pick a file: its neighbours, itself first
    picked = page_corpus["images"] / "风景" / "011.png"
    browser.execute_script("document.getElementById('file').style.display = 'block'")
    _clear(browser)
    browser.find_element("id", "file").send_keys(str(picked))
    assert _shown(browser, 8, "file picker")[0] == "风景/011.png"

    # drop an image (a File in a DataTransfer, as a drag from the desktop delivers it)
    _clear(browser)
    browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch('/image?id=' + encodeURIComponent('animals/012.jpg')).then(r => r.blob()).then(blob => {
          const dt = new DataTransfer();
          dt.items.add(new File([blob], '012.jpg', {type: 'image/jpeg'}));
          document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
          done();
        });
        """
    )
    assert _shown(browser, 8, "drop")[0] == "animals/012.jpg"

    # a bad query shows the one-line error, and the page keeps working
    box.clear()
    box.send_keys("   ")
    browser.find_element("css selector", "#search button").click()
    _wait(browser, "return document.getElementById('status').className === 'error'", "the error")
    assert "q is empty" in browser.find_element("id", "status").text

    # phone width: nothing scrolls sideways
    browser.set_window_size(390, 844)
    box.clear()
    box.send_keys("红色的汽车")
    _clear(browser)
    browser.find_element("css selector", "#search button").click()
    _shown(browser, 8, "phone-width search")
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.set_window_size(1000, 900)


def test_a_10000_character_query_through_real_http(server):
    url, _ = server
    q = urllib.parse.quote("猫" * 10_000)  # 90 KB of URL: within the request-line limit ccj-serve sets
    answer = json.load(urllib.request.urlopen(f"{url}/search?q={q}&k=3", timeout=60))
    assert answer["query"]["truncated"] and answer["query"]["tokens"] == 10_002 and len(answer["hits"]) == 3
