"""Fixtures for the queue panel in a real headless Chromium against a real ``gpuyard
serve`` process: one server (``panel``) and one browser per module, a fresh browser
context per test (``page``). See ``panel_harness`` for what the server holds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # panel_harness, in any import mode
    sys.path.insert(0, str(HERE))

from panel_harness import (
    LAPTOP,
    USERS,
    Panel,
    ServerProcess,
    launch_chromium,
    write_configs,
)


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Panel]:
    data_dir = tmp_path_factory.mktemp("panel") / "data"
    write_configs(data_dir)
    with ServerProcess(data_dir, gpus="4xA100:40") as server:
        opened = Panel(server)
        for name, level, team in USERS:
            creator = "ada" if opened.tokens else None
            created = opened.post("/api/users", {"name": name, "level": level, "team_id": team},
                                  who=creator)  # type: ignore[arg-type]
            opened.tokens[name] = created["token"]
            opened.user_ids[name] = created["user_id"]
            opened.levels[name] = level
        anchor = opened.post("/api/queue/submit", {"config_name": "anchor"}, "ada")
        assert anchor["status"] == "running", anchor
        yield opened


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (its own session storage) on a laptop-sized screen; any
    JavaScript error on the page fails the test."""
    context = browser.new_context(viewport=LAPTOP)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


