"""The queue panel (issue 6) in headless Chromium against a real server (see conftest)."""

from __future__ import annotations

from typing import Any

import pytest
from panel_harness import (
    ARTIFACTS,
    Panel,
    ServerProcess,
    restore_limits,
    row,
    shown_rows,
    sign_in,
    synced,
    write_configs,
)
from playwright.sync_api import Browser, Page, expect

FIGURES = {  # element id -> field of GET /api/queue/stats
    "fig-queued": "queue_depth",
    "fig-running": "running",
    "fig-max-concurrent": "max_concurrent",
    "fig-avg-wait": "avg_wait_seconds",
    "fig-blocked": "blocked",
}


def figure(page: Page, element_id: str) -> tuple[str, str]:
    value = page.locator(f"#{element_id} .value")
    return value.get_attribute("data-value") or "", value.inner_text()


def expected_row(entry: dict[str, Any], names: dict[int, str], me: int) -> dict[str, Any]:
    name = names[entry["user_id"]] + (" (you)" if entry["user_id"] == me else "")
    return {
        "job_id": entry["job_id"],
        "status": entry["status"],
        "position": "" if entry["position"] is None else str(entry["position"]),
        "user": name,
        "team": entry["team_id"] or "–",
        "config": entry["config_name"],
        "priority": str(entry["effective_priority"]),
    }


def open_action(page: Page, job_id: str, action: str) -> None:
    row(page, job_id).locator(f'button[data-action="{action}"]').click()
    expect(page.locator("#action-dialog")).to_be_visible()


def test_figures_and_table_match_the_api(panel: Panel, page: Page) -> None:
    submitted = [
        panel.submit("sleeper", "rita", metadata={"run_name": "baseline"}),
        panel.submit("cpu", "rita"),
        panel.submit("pair", "lee"),
        panel.submit("costly", "vic"),  # over the approval threshold: blocked
        panel.submit("sleeper", "ada", requires_approval=True),
    ]
    sign_in(page, panel, "ada")

    stats = panel.get("/api/queue/stats")
    for element_id, field in FIGURES.items():
        raw, text = figure(page, element_id)
        if field == "avg_wait_seconds":
            assert stats[field] is not None  # the anchor job started
            assert float(raw) == pytest.approx(stats[field])
            assert text.endswith("s")
        else:
            assert (raw, text) == (str(stats[field]), str(stats[field])), element_id
    assert stats["blocked"] >= 2 and stats["queue_depth"] >= 3

    listing = panel.get("/api/queue", limit=200)
    names = panel.names()
    rows = shown_rows(page)
    wanted = [expected_row(entry, names, panel.user_ids["ada"]) for entry in listing["entries"]]
    assert [{key: r[key] for key in wanted[0]} for r in rows] == wanted
    assert set(submitted) <= {r["job_id"] for r in rows}
    by_id = {r["job_id"]: r for r in rows}
    assert by_id[submitted[0]]["gpus"] == "needs 1" and by_id[submitted[1]]["gpus"] == "CPU"
    assert page.locator(f'#queue-rows tr[data-job-id="{submitted[0]}"] .col-job').inner_text() \
        .endswith("baseline")

    # the GPU map: the anchor job holds GPU 0, the rest are free
    allocation = panel.get("/api/system/status", include_allocation="true")["gpu_allocation"]
    tiles = page.locator("#gpu-map li.gpu")
    expect(tiles).to_have_count(len(allocation["devices"]))
    for device, tile in zip(allocation["devices"], tiles.all(), strict=True):
        state = f"held by {device['job_id']}" if device["allocated"] else "free"
        assert tile.inner_text().split("\n") == [
            f"GPU {device['index']}", f"A100 · {device['memory_gb']:g} GB", state]

    # terminal jobs on request, and the filters ask the API for what they show
    panel.post(f"/api/queue/{submitted[1]}/cancel", who="rita")
    synced(page, panel)
    expect(row(page, submitted[1])).to_have_count(0)
    page.select_option("#filter-status", "all")
    expect(row(page, submitted[1])).to_have_attribute("data-status", "cancelled")
    page.select_option("#filter-status", "blocked")
    page.select_option("#filter-user", str(panel.user_ids["vic"]))
    vics_blocked = panel.get("/api/queue", status="blocked", user_id=panel.user_ids["vic"])
    expect(page.locator("#queue-rows tr")).to_have_count(len(vics_blocked["entries"]))
    assert [r["job_id"] for r in shown_rows(page)] == [
        e["job_id"] for e in vics_blocked["entries"]]
    expect(row(page, submitted[3])).to_have_attribute("data-status", "blocked")


def test_cancel_approve_reject_and_priority_through_the_page(panel: Panel, page: Page) -> None:
    costly = panel.submit("costly", "vic")
    to_reject = panel.submit("sleeper", "rita", requires_approval=True)
    to_boost = panel.submit("sleeper", "rita")
    to_cancel = panel.submit("cpu", "lee")
    sign_in(page, panel, "ada")

    open_action(page, costly, "approve")
    page.click("#action-confirm")
    expect(page.locator("#action-dialog")).to_be_hidden()
    assert panel.job(costly)["status"] == "pending"
    expect(row(page, costly)).to_have_attribute("data-status", "pending")

    open_action(page, to_reject, "reject")
    page.fill("#action-input", "too big for this week")
    page.click("#action-confirm")
    expect(page.locator("#action-dialog")).to_be_hidden()
    rejected = panel.job(to_reject)
    assert (rejected["status"], rejected["error_message"]) == ("rejected", "too big for this week")

    open_action(page, to_boost, "priority")
    page.fill("#action-input", "101")  # out of range: the server's message, nothing changes
    page.click("#action-confirm")
    expect(page.locator("#action-error")).to_contain_text("priority")
    assert panel.job(to_boost)["priority_override"] is None
    page.fill("#action-input", "77")
    page.click("#action-confirm")
    expect(page.locator("#action-dialog")).to_be_hidden()
    boosted = panel.job(to_boost)
    assert (boosted["priority_override"], boosted["effective_priority"]) == (77, 77)
    assert boosted["position"] == 1
    expect(row(page, to_boost).locator(".col-pos")).to_have_text("1")
    expect(row(page, to_boost).locator(".tag.override")).to_have_text("override 77")

    open_action(page, to_boost, "priority")
    page.click("#action-extra")  # remove the override
    expect(page.locator("#action-dialog")).to_be_hidden()
    assert panel.job(to_boost)["priority_override"] is None

    open_action(page, to_cancel, "cancel")
    page.click("#action-confirm")
    expect(page.locator("#action-dialog")).to_be_hidden()
    assert panel.job(to_cancel)["status"] == "cancelled"
    expect(row(page, to_cancel)).to_have_count(0)

    # "why is it waiting?" shows the explain endpoint's reasons
    row(page, to_boost).locator('button[data-action="explain"]').click()
    codes = [r["code"] for r in panel.get(f"/api/queue/{to_boost}/explain")["reasons"]]
    assert codes
    for code in codes:
        expect(page.locator("#detail-body")).to_contain_text(code)
    page.click("#detail-close")

    # the log tail of the running anchor job
    anchor = next(e for e in panel.get("/api/queue", status="running")["entries"]
                  if e["config_name"] == "anchor")
    row(page, anchor["job_id"]).locator('button[data-action="logs"]').click()
    expect(page.locator("#detail-body pre")).to_contain_text("hello from the anchor job")
    page.click("#detail-close")


def test_a_viewer_sees_no_admin_actions_and_a_forged_call_gets_403(panel: Panel, page: Page) -> None:
    own = panel.submit("sleeper", "vic")
    blocked_other = panel.submit("sleeper", "rita", requires_approval=True)
    sign_in(page, panel, "vic")

    rows = shown_rows(page)
    mine = panel.get("/api/queue", who="vic", limit=200)["entries"]
    assert [r["job_id"] for r in rows] == [e["job_id"] for e in mine]
    assert {e["user_id"] for e in mine} == {panel.user_ids["vic"]}
    actions = {action for r in rows for action in r["actions"]}
    assert actions.isdisjoint({"approve", "reject", "priority"})
    assert "cancel" in next(r for r in rows if r["job_id"] == own)["actions"]
    expect(page.locator("#settings")).to_be_hidden()
    expect(page.locator("#filter-user-label")).to_be_hidden()
    expect(page.locator("#who")).to_contain_text("vic · viewer · team nlp")

    settings_before = panel.get("/api/queue/concurrency")
    forged = page.evaluate(
        """async ([blocked]) => {
            const token = sessionStorage.getItem('gpuyard.token');
            const call = async (path, body) => {
                const r = await fetch(path, {method: 'POST', body: JSON.stringify(body),
                    headers: {'Authorization': 'Bearer ' + token,
                              'Content-Type': 'application/json'}});
                return [r.status, (await r.json()).detail];
            };
            return [await call('/api/queue/concurrency', {max_concurrent: 1}),
                    await call('/api/queue/' + blocked + '/approve', {})];
        }""",
        [blocked_other],
    )
    assert [status for status, _ in forged] == [403, 403], forged
    assert all("admin" in detail for _, detail in forged)
    assert panel.get("/api/queue/concurrency") == settings_before
    assert panel.job(blocked_other)["status"] == "blocked"

    # the token lives in this tab's session storage only
    storage = page.evaluate("() => [sessionStorage.getItem('gpuyard.token'), localStorage.length,"
                            " document.cookie]")
    assert storage == [panel.tokens["vic"], 0, ""]


def test_a_change_made_through_the_api_appears_without_a_reload(panel: Panel, page: Page) -> None:
    blocked = panel.submit("sleeper", "rita", requires_approval=True)
    sign_in(page, panel, "lee")
    # a lead may cancel and override anyone's job, but not approve, reject or change settings
    actions = next(r["actions"] for r in shown_rows(page) if r["job_id"] == blocked)
    assert actions == ["cancel", "priority", "explain", "logs"]
    expect(page.locator("#settings")).to_be_hidden()
    page.evaluate("() => { window.notReloaded = true; }")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))

    page.wait_for_timeout(2000)  # idle: one small read a second, nothing else
    assert requests, "the page stopped polling"
    assert {url.removeprefix(panel.url) for url in requests} == {"/api/panel/changes"}

    job_id = panel.submit("sleeper", "rita", metadata={"run_name": "live"})
    expect(row(page, job_id)).to_have_attribute("data-status", "pending", timeout=3000)
    queued = panel.get("/api/queue/stats")["queue_depth"]
    expect(page.locator("#fig-queued .value")).to_have_text(str(queued))

    panel.post(f"/api/queue/{job_id}/priority", {"priority": 55}, who="lee")
    expect(row(page, job_id).locator(".col-priority .prio")).to_have_text("55", timeout=3000)
    panel.post(f"/api/queue/{job_id}/cancel", who="rita")
    expect(row(page, job_id)).to_have_count(0, timeout=3000)
    assert page.evaluate("() => window.notReloaded") is True


def test_an_invalid_limit_shows_the_servers_message_and_changes_nothing(
    panel: Panel, page: Page
) -> None:
    sign_in(page, panel, "ada")
    before = panel.get("/api/queue/concurrency")
    fields = page.locator("#settings-fields .field")
    assert sorted(fields.evaluate_all("(nodes) => nodes.map((n) => n.dataset.field)")) \
        == sorted(before)  # every setting has its field
    expect(page.locator("#set-max_concurrent")).to_have_value(str(before["max_concurrent"]))

    page.fill("#set-max_concurrent", "0")
    page.click("#settings-save")
    error = page.locator('.field[data-field="max_concurrent"] .field-error')
    refused = panel.call("POST", "/api/queue/concurrency", json={"max_concurrent": 0})
    assert refused.status_code == 422
    expect(error).to_have_text(refused.json()["detail"])
    expect(page.locator("#settings-message")).to_contain_text("not saved")
    assert panel.get("/api/queue/concurrency") == before
    expect(page.locator("#fig-max-concurrent .value")).to_have_text(str(before["max_concurrent"]))

    page.fill("#set-local_gpu_max_concurrent", "lots")
    page.fill("#set-max_concurrent", str(before["max_concurrent"]))
    page.click("#settings-save")
    expect(page.locator('.field[data-field="local_gpu_max_concurrent"] .field-error')) \
        .to_contain_text("local_gpu_max_concurrent")
    expect(error).to_have_text("")
    assert panel.get("/api/queue/concurrency") == before

    # a valid edit goes through and the figures follow
    page.fill("#set-local_gpu_max_concurrent", "")
    page.fill("#set-max_concurrent", "7")
    page.check("#set-enable_fair_share")
    page.click("#settings-save")
    expect(page.locator("#settings-message")).to_contain_text("saved")
    try:
        after = panel.get("/api/queue/concurrency")
        assert after == {**before, "max_concurrent": 7, "enable_fair_share": True}
        expect(page.locator("#fig-max-concurrent .value")).to_have_text("7")
    finally:
        restore_limits(panel)


def test_a_busy_queue_screenshot_on_a_laptop_and_a_phone(
    panel: Panel, browser: Browser, page: Page
) -> None:
    panel.post("/api/queue/concurrency", {"local_job_max_concurrent": 3, "max_concurrent": 6})
    try:
        for who, config in [("rita", "sleeper"), ("lee", "pair"), ("vic", "cpu"),
                            ("rita", "sleeper"), ("lee", "sleeper"), ("vic", "costly"),
                            ("ada", "pair"), ("rita", "cpu")]:
            panel.submit(config, who, metadata={"run_name": f"{who}-{config}"})
        boosted = panel.submit("sleeper", "vic")
        panel.post(f"/api/queue/{boosted}/priority", {"priority": 60}, who="lee")
        rejected = panel.submit("sleeper", "rita", requires_approval=True)
        panel.post(f"/api/queue/{rejected}/reject", who="ada", reason="wrong dataset")

        sign_in(page, panel, "ada")
        stats = panel.get("/api/queue/stats")
        assert stats["running"] >= 2 and stats["queue_depth"] >= 5 and stats["blocked"] >= 1
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "panel.png"), full_page=True)

        phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                    has_touch=True, device_scale_factor=2)
        try:
            small = phone.new_page()
            sign_in(small, panel, "ada")
            overflow = small.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, "the panel is wider than a phone screen"
            expect(small.locator("#queue-table thead")).to_be_hidden()  # rows are cards
            small.screenshot(path=str(ARTIFACTS / "panel-phone.png"), full_page=True)
        finally:
            phone.close()
    finally:
        restore_limits(panel)
    assert (ARTIFACTS / "panel.png").stat().st_size > 10_000
    assert (ARTIFACTS / "panel-phone.png").stat().st_size > 10_000


def test_the_token_box_appears_only_when_authentication_is_on(
    panel: Panel, browser: Browser, page: Page, tmp_path: Any
) -> None:
    page.goto(panel.url + "/")
    expect(page.locator("#auth-message")).to_have_text("this server needs a token")
    expect(page.locator("#main")).to_be_hidden()
    page.fill("#token-input", "not-a-token")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#auth-message")).to_contain_text("token not accepted")
    expect(page.locator("#main")).to_be_hidden()
    page.fill("#token-input", panel.tokens["rita"])
    page.click("#token-form button[type=submit]")
    expect(page.locator("body")).to_have_attribute("data-level", "researcher")
    expect(page.locator("#auth")).to_be_hidden()
    page.click("#sign-out")
    expect(page.locator("#main")).to_be_hidden()
    expect(page.locator("#auth-message")).to_have_text("this server needs a token")
    assert page.evaluate("() => sessionStorage.length") == 0

    # single-user mode: no token box, the local admin sees the admin settings
    data_dir = tmp_path / "solo"
    write_configs(data_dir)
    with ServerProcess(data_dir, gpus="2xL4:24") as solo:
        page.goto(solo.url + "/")
        expect(page.locator("body")).to_have_attribute("data-level", "admin")
        expect(page.locator("#auth")).to_be_hidden()
        expect(page.locator("#settings")).to_be_visible()
        expect(page.locator("#who")).to_contain_text("single-user mode")
        expect(page.locator("#gpu-map li.gpu")).to_have_count(2)
