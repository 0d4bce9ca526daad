"""End to end in headless Chromium: upload a radiograph, wait for the verdict and the three maps."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import needs_data, needs_weights

pytestmark = [needs_weights, needs_data]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield b
        b.close()


def test_upload_shows_verdict_and_three_maps(app, browser, radiographs):
    _, _, url = app
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_text("Not a medical device").first.wait_for(timeout=30_000)
    page.locator("input[type=file]").first.set_input_files(str(radiographs["humerus"]))
    page.get_by_text("abnormality probability").first.wait_for(timeout=60_000)
    for elem in ("map-gradcam", "map-gradcampp", "map-saliency"):
        page.locator(f"#{elem} img").first.wait_for(timeout=30_000)
    text = page.inner_text("body")
    assert "Body part:" in text and "Decision threshold" in text
    shots = Path(os.environ.get("MURA_DEMO_SCREENSHOTS", tempfile.gettempdir()))
    page.screenshot(path=str(shots / "mura-demo-browser.png"), full_page=True)
    # a bad file gets a clear message and the page keeps working
    bad = Path(tempfile.mkdtemp()) / "notes.png"
    bad.write_bytes(b"not an image at all" * 10)
    page.get_by_label("Clear").first.click()  # remove the radiograph, then upload the bad file
    page.locator("input[type=file]").first.set_input_files(str(bad))
    page.get_by_text("not an image that can be read").first.wait_for(timeout=30_000)
    page.close()
