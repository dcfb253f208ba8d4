"""A JSON body's values must have their declared types: "3" is not an int, "true" not a bool."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio


def event_count(api) -> int:
    return api.runtime.event_log.last_seq


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/queue/concurrency", {"max_concurrent": "3"}, "max_concurrent"),
        ("/api/queue/concurrency", {"enable_fair_share": "true"}, "enable_fair_share"),
        ("/api/queue/concurrency", {"enable_fair_share": 1}, "enable_fair_share"),
        ("/api/queue/submit", {"config_name": "cpu", "num_processes": "0"}, "num_processes"),
        ("/api/queue/submit", {"config_name": "cpu", "no_wait": "false"}, "no_wait"),
        ("/api/queue/cancel", {"all": "true"}, "all"),
        ("/api/users", {"name": "root", "level": "admin", "team_id": 7}, "team_id"),
    ],
)
async def test_a_value_of_the_wrong_json_type_is_422_and_writes_nothing(
    api, path: str, body: dict, field: str
) -> None:
    before = event_count(api)
    response = await api.post(path, body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert event_count(api) == before


async def test_right_types_still_pass(api) -> None:
    response = await api.post("/api/queue/concurrency",
                              {"max_concurrent": 4, "starvation_threshold_minutes": 30,
                               "local_gpu_max_concurrent": None, "enable_fair_share": True})
    assert response.status_code == 200, response.text
    assert response.json()["max_concurrent"] == 4
    assert response.json()["starvation_threshold_minutes"] == 30.0
