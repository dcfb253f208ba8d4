"""Helpers for the queue panel's browser tests (the fixtures are in ``conftest.py``).

One server and one browser per module. The server runs with ``--gpus 4xA100:40`` and
authentication on: an admin, a lead and a researcher of team ``vision``, a viewer of
team ``nlp``. An ``anchor`` job of the admin runs from the start and holds the one
local job slot (``local_job_max_concurrent`` defaults to 1), so every job a test submits
stays pending or blocked unless the test raises the limits (and puts them back).

Chromium is Debian's ``/usr/bin/chromium`` (``make test`` installs it when missing;
``GPUYARD_CHROMIUM`` names another binary); Playwright drives it and never downloads a
browser of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from serverproc import ServerProcess

CHROMIUM = os.environ.get("GPUYARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = TESTS / "artifacts"
LAPTOP = {"width": 1280, "height": 900}

CONFIGS = {
    "anchor": 'command = ["sh", "-c", "echo hello from the anchor job; exec sleep 600"]\n'
              "num_processes = 1\n",
    "sleeper": 'command = ["sleep", "600"]\nnum_processes = 1\n',
    "cpu": 'command = ["sleep", "600"]\nnum_processes = 0\n',
    "pair": 'command = ["sleep", "600"]\nnum_processes = 2\n',
    "costly": 'command = ["sleep", "600"]\nnum_processes = 1\nestimated_cost = 100.0\n',
}

USERS = (  # name, level, team
    ("ada", "admin", None),
    ("lee", "lead", "vision"),
    ("rita", "researcher", "vision"),
    ("vic", "viewer", "nlp"),
)

DEFAULT_LIMITS = {"max_concurrent": 5, "user_max_concurrent": 2, "team_max_concurrent": 10,
                  "enable_fair_share": False, "local_gpu_max_concurrent": None,
                  "local_job_max_concurrent": 1}


class Panel:
    """The server under test, its users' tokens, and API shortcuts acting as a user."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.tokens: dict[str, str] = {}
        self.user_ids: dict[str, int] = {}
        self.levels: dict[str, str] = {}

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, method: str, path: str, who: str | None = "ada", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=30.0, **kwargs)

    def get(self, path: str, who: str = "ada", **params: Any) -> Any:
        response = self.call("GET", path, who, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body: Any = None, who: str = "ada", **params: Any) -> Any:
        response = self.call("POST", path, who, json=body, params=params)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def submit(self, config: str = "sleeper", who: str = "rita", **fields: Any) -> str:
        answer = self.post("/api/queue/submit", {"config_name": config, **fields}, who)
        return str(answer["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/api/queue/{job_id}")  # type: ignore[no-any-return]

    def seq(self) -> int:
        return int(self.get("/api/panel/changes")["seq"])

    def names(self) -> dict[int, str]:
        return {user["user_id"]: user["name"] for user in self.get("/api/users")["users"]}


def write_configs(data_dir: Path) -> None:
    configs = data_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    for name, text in CONFIGS.items():
        (configs / f"{name}.toml").write_text(text)


def launch_chromium(playwright: Any) -> Browser:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: `make test` installs Debian's "
                    "chromium package (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # type: ignore[no-any-return]


def sign_in(page: Page, panel: Panel, who: str) -> None:
    """Open the panel and paste ``who``'s token into the token box."""
    page.goto(panel.url + "/")
    expect(page.locator("#auth")).to_be_visible()
    page.fill("#token-input", panel.tokens[who])
    page.click("#token-form button[type=submit]")
    expect(page.locator("body")).to_have_attribute("data-level", panel.levels[who])
    synced(page, panel)


def synced(page: Page, panel: Panel) -> None:
    """Wait until the page shows data at least as new as the server's last event."""
    expect(page.locator("body")).to_have_attribute("data-seq", str(panel.seq()))


def row(page: Page, job_id: str) -> Any:
    return page.locator(f'#queue-rows tr[data-job-id="{job_id}"]')


def shown_rows(page: Page) -> list[dict[str, str]]:
    """The queue table as text, one dict per row."""
    return page.evaluate(  # type: ignore[no-any-return]
        """() => [...document.querySelectorAll('#queue-rows tr')].map((tr) => {
            const text = (cls) => tr.querySelector('.' + cls).textContent.trim();
            return {job_id: tr.dataset.jobId, status: tr.dataset.status,
                    position: text('col-pos'), user: text('col-user'), team: text('col-team'),
                    config: text('col-config'),
                    priority: tr.querySelector('.col-priority .prio').textContent,
                    gpus: text('col-gpus'),
                    actions: [...tr.querySelectorAll('button[data-action]')]
                               .map((b) => b.dataset.action)};
        })"""
    )


def restore_limits(panel: Panel) -> None:
    panel.post("/api/queue/concurrency", DEFAULT_LIMITS)
