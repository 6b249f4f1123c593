"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright against a real gateway.

Every request a page makes is checked: anything not addressed to the gateway under test is aborted and
recorded, and `Browser.close` fails the test if there was one (the UI must work with no internet at all).
Screenshots go to docs/screenshots/ (linked from the README).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
PHONE = {"width": 360, "height": 740}
DESKTOP = {"width": 1280, "height": 800}
# the probe's flags: without the background-networking ones Chromium calls home at every start
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@dataclass
class Browser:
    base: str
    browser: Any
    outside: list[str] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)

    async def context(self, viewport: dict[str, int] | None = None) -> Any:
        ctx = await self.browser.new_context(viewport=viewport or DESKTOP, base_url=self.base)
        await ctx.route("**/*", self._only_the_gateway)
        self.contexts.append(ctx)
        return ctx

    async def _only_the_gateway(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(self.base + "/") or url == self.base or url.startswith(("data:", "blob:")):
            await route.continue_()
        else:
            self.outside.append(url)
            await route.abort()

    async def signed_in(self, username: str, password: str, viewport: dict[str, int] | None = None) -> Any:
        """A new browser context (its own cookies) with `username` signed in, on the calls page."""
        ctx = await self.context(viewport)
        page = await ctx.new_page()
        await page.goto("/login")
        await page.fill("input[name=username]", username)
        await page.fill("input[name=password]", password)
        await page.click("button:has-text('Sign in')")
        await page.wait_for_url(re.compile(r".*/calls$"))
        return page

    async def shot(self, page: Any, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        return path


@contextlib.asynccontextmanager
async def chromium(base: str) -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():  # noqa: ASYNC240 - one stat before a browser starts
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        session = Browser(base, browser)
        try:
            yield session
        finally:
            for ctx in session.contexts:
                with contextlib.suppress(Exception):
                    await ctx.close()
            await browser.close()
        assert not session.outside, f"pages asked for resources outside the gateway: {session.outside}"
