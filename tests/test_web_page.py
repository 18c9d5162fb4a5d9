"""The web page at / driven by a real headless Chromium against a real policy server.

Picks a shipped sample, predicts 3 frames and waits until they have streamed into the page,
then checks a screenshot (saved to out/test-artifacts/web_page.png) is not blank and the
browser console stayed clean. Errors, caught in the page or answered by the server as
problem details, must show up as a readable message.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.browser import console_errors, headless_chrome
from tests.support.processes import REPO_ROOT
from tests.support.servers import PolicyServer, run_policy_server

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO_ROOT / "out" / "test-artifacts"
STATIC_SAMPLES = (
    REPO_ROOT / "services" / "policy_server" / "src" / "gr2_policy" / "api" / "static" / "samples"
)
STREAM_TIMEOUT_S = 120.0

# JavaScript predicates evaluated in the page (no fixed sleeps anywhere).
PAGE_READY = "return document.body.dataset.ready === 'true' && !!document.querySelector('.sample')"
INPUTS_LOADED = """
const imgs = [...document.querySelectorAll('#frames img.input-image')];
return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)
    && document.getElementById('instruction').value.trim() !== '';
"""
STREAM_STATE = """
const frames = [...document.querySelectorAll('#frames img.frame')];
const error = document.getElementById('error');
return {
  state: document.getElementById('progress').dataset.state,
  progress: document.getElementById('progress').textContent,
  error: error.hidden ? '' : error.textContent,
  loaded: frames.filter(i => i.complete && i.naturalWidth > 0).length,
  animating: document.getAnimations().filter(a => a.playState === 'running').length,
};
"""
ERROR_TEXT = (
    "const e = document.getElementById('error'); return e.hidden ? '' : e.textContent.trim();"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyServer]:
    with run_policy_server(
        Path(tmp_path_factory.mktemp("web")), extra_args=("--random-weights",)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def driver() -> Iterator:
    with headless_chrome() as drv:
        yield drv


def wait_for(driver, script: str, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(
        lambda d: d.execute_script(script)
    )


def open_page(driver, server: PolicyServer) -> None:  # type: ignore[no-untyped-def]
    driver.get(f"{server.http_url}/")
    assert driver.title == "GR-2 Serve: imagine the future"
    wait_for(driver, PAGE_READY)


def pick_first_sample(driver) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#samples .sample").click()
    wait_for(driver, INPUTS_LOADED)


def set_value(driver, element_id: str, value: str) -> None:  # type: ignore[no-untyped-def]
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change'));",
        element_id,
        value,
    )


def view_names(driver) -> list[str]:  # type: ignore[no-untyped-def]
    return driver.execute_script(
        "return [...document.querySelectorAll('#frames .view-row')].map(r => r.dataset.view)"
    )


def test_predict_streams_frames_into_the_page(driver, server: PolicyServer) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(driver, server)
    views = view_names(driver)
    assert views, "the page built no view rows from /v1/info"
    pick_first_sample(driver)
    set_value(driver, "num-frames", "3")
    driver.find_element(By.ID, "predict").click()

    def streamed(d):  # type: ignore[no-untyped-def]
        s = d.execute_script(STREAM_STATE)
        if s["state"] == "error" or s["error"]:
            raise AssertionError(f"the page shows an error: {s['error'] or s['progress']}")
        done = s["state"] == "done" and s["loaded"] == 3 * len(views) and not s["animating"]
        return s if done else False

    final = WebDriverWait(driver, STREAM_TIMEOUT_S, poll_frequency=0.2).until(streamed)
    assert "3 / 3" in final["progress"]
    for view in views:
        frames = driver.find_elements(By.CSS_SELECTOR, f"#predicted-{view} img.frame")
        assert [f.get_attribute("data-frame-index") for f in frames] == ["0", "1", "2"]
        assert all(f.get_attribute("src").startswith("data:image/") for f in frames)
    assert driver.find_element(By.ID, "predict").is_enabled()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot_path = ARTIFACTS / "web_page.png"
    assert driver.save_screenshot(str(shot_path))
    shot = np.asarray(Image.open(shot_path).convert("RGB"))
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 200, f"screenshot looks blank: only {len(colours)} colours"
    assert shot.std() > 10.0, f"screenshot looks blank: pixel std {shot.std():.1f}"

    # The predicted frames as rendered (scaled up, pixelated) are real pictures, not a flat fill.
    for view in views:
        row = driver.find_element(By.CSS_SELECTOR, f"#predicted-{view}")
        first = row.find_element(By.CSS_SELECTOR, "img.frame")
        assert first.size["width"] >= 2 * driver.execute_script(
            "return arguments[0].naturalWidth", first
        ), "predicted frames should be shown scaled up"
        pixels = np.asarray(Image.open(io.BytesIO(first.screenshot_as_png)).convert("RGB"))
        assert pixels.std() > 1.0, f"predicted {view} frame renders as a uniform block"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 4

    errors = console_errors(driver)
    assert not errors, f"browser console errors: {errors}"


def test_wrong_size_upload_shows_a_readable_message(
    driver,  # type: ignore[no-untyped-def]
    server: PolicyServer,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    view = view_names(driver)[0]
    wrong = tmp_path / "wrong.png"
    Image.new("RGB", (32, 20), (200, 30, 30)).save(wrong)
    driver.find_element(By.ID, f"upload-{view}").send_keys(str(wrong))

    message = wait_for(driver, ERROR_TEXT)
    assert "32×20" in message and view in message, message
    assert driver.find_element(By.ID, "error").is_displayed()
    # The rejected file is not used as an input.
    input_src = "return document.getElementById(arguments[0]).getAttribute('src')"
    assert not driver.execute_script(input_src, f"input-{view}")

    # An image of the right size is taken and clears the message.
    right = STATIC_SAMPLES / "touch-1000000" / f"{view}.png"
    driver.find_element(By.ID, f"upload-{view}").send_keys(str(right))
    wait_for(driver, f"return !!document.getElementById('input-{view}').naturalWidth")
    wait_for(driver, "return document.getElementById('error').hidden")


def test_missing_instruction_and_server_rejection_show_readable_messages(
    driver,  # type: ignore[no-untyped-def]
    server: PolicyServer,
) -> None:
    from selenium.webdriver.common.by import By

    open_page(driver, server)
    pick_first_sample(driver)

    # Caught in the page before anything is sent.
    set_value(driver, "instruction", "   ")
    driver.find_element(By.ID, "predict").click()
    assert "instruction" in wait_for(driver, ERROR_TEXT).lower()

    # Rejected by the server (4xx problem details): its `detail` is shown, not raw JSON.
    set_value(driver, "instruction", "push the block " * 60)
    driver.find_element(By.ID, "predict").click()
    wait_for(
        driver,
        "return document.getElementById('progress').dataset.state === 'error'",
        STREAM_TIMEOUT_S,
    )
    message = wait_for(driver, ERROR_TEXT)
    assert "instruction" in message.lower(), message
    assert "{" not in message, f"raw JSON shown instead of the problem detail: {message}"
    assert not driver.find_elements(By.CSS_SELECTOR, "#frames img.frame")
    assert driver.find_element(By.ID, "predict").is_enabled()
