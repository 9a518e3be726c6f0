"""The web page at `/` in a real headless browser (Debian's chromium, driven by Playwright, no
browser download): settings in, per-step previews while the images are made, then each image
with its settings and seed to copy."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from pydiff.serving import BackgroundServer  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_page_generates_with_previews_and_shows_settings(tmp_path):
    with BackgroundServer(["digits", "shapes"]) as server, sync_api.sync_playwright() as pw:
        # a fresh profile: launch_persistent_context passes it as --user-data-dir
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            page = ctx.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length == 2")

            # the shapes cascade: a prompt, 2 images, few steps, a seed
            page.select_option("#model", "shapes")
            page.fill("#prompt", "a red circle on a blue background")
            page.fill("#n", "2")
            page.fill("#steps", "4")
            page.fill("#seed", "9")
            page.click("#generate")
            page.wait_for_selector(".result img", timeout=60_000)
            stats = page.evaluate("window.pydiffStats")
            assert stats["previews"] == 8 and stats["stages"] == ["base", "sr64"]  # 4 steps x 2 stages
            results = page.query_selector_all(".result")
            assert len(results) == 2
            info = json.loads(results[0].query_selector("pre.settings").inner_text())
            assert info["seed"] == 9 and info["request"]["seed"] == 9
            assert info["request"]["steps"] == {"base": 4, "sr64": 4}
            assert info["request"]["prompt"] == "a red circle on a blue background"
            loaded = page.evaluate("[...document.querySelectorAll('.result img')].map(i => i.naturalWidth)")
            assert loaded == [64, 64]

            # a class-conditional model: the page asks for labels instead
            page.select_option("#model", "digits")
            assert page.is_visible("#class_label") and not page.is_visible("#prompt")
            page.fill("#class_label", "3, 7")
            page.fill("#n", "1")
            page.fill("#seed", "")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('.result').length == 4", timeout=60_000)
            assert "class 7" in page.inner_text("#results")

            # a bad setting: the server's message on the page
            page.fill("#steps", "100000")
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
            assert "steps" in page.inner_text("#error") and "400" in page.inner_text("#error")
        finally:
            ctx.close()
