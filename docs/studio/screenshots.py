"""The README's runs and playground screenshots, over this checkout's outputs/ folder: the runs list, and the
bundled SmolLM2 beside the quickstart's adapter (run `make demo` first, which writes outputs/quickstart). The
other screenshots come from tests/test_studio_browser.py with DELTATUNE_SCREENSHOTS=docs/studio.
Usage: python docs/studio/screenshots.py"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
from playwright.sync_api import expect, sync_playwright

URL = "http://127.0.0.1:7872"
TWEET = "Just got my new bike and the first ride was amazing!"
ASK = 'Classify the sentiment of this tweet as negative, neutral or positive. Reply with JSON only, like {"sentiment": "neutral"}.'


def main() -> None:
    studio = subprocess.Popen(
        [sys.executable, "-m", "deltatune", "studio", "--runs", "outputs", "--port", "7872"]
    )
    try:
        while True:
            try:
                if httpx.get(URL + "/api/runs").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium")
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            expect.set_options(timeout=600_000)
            page.goto(URL + "/")
            page.screenshot(path="docs/studio/runs.png")
            page.goto(URL + "/playground?run=quickstart")
            expect(page.locator("#base-state")).to_have_text("ready")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "40")
            page.fill("#message", f"{ASK}\n\n{TWEET}")
            page.click("#send")
            for answer in page.locator(".column .turn.assistant").all():
                expect(answer).to_have_attribute("data-finish", re.compile("stop|length"))
            page.screenshot(path="docs/studio/playground.png")
            browser.close()
    finally:
        studio.terminate()


if __name__ == "__main__":
    main()
