"""Configs (list, read, write as TOML) and the audit export (JSONL and CSV, filters, a
hash chain that verifies from the export alone) over HTTP."""

from __future__ import annotations

import csv
import io
import json
import time
import tomllib
from datetime import UTC, datetime

import pytest

from events.export import row_from_export
from events.log import verify_rows
from service.audit import write_export
from service.commands import ConfigSpec, InvalidRequest, UnknownConfig
from service.configs import ConfigStore, check_name

pytestmark = pytest.mark.anyio


async def test_list_and_read_configs(api, data_dir) -> None:
    (data_dir / "configs" / "broken.toml").write_text("command = 3\n")
    listing = (await api.get("/api/configs")).json()
    assert [c["name"] for c in listing["configs"]] == ["costly", "cpu", "pair", "sleeper", "stubborn"]
    assert [bad["name"] for bad in listing["invalid"]] == ["broken"]
    assert "broken.toml" in listing["invalid"][0]["error"]
    pair = (await api.get("/api/configs/pair")).json()
    assert pair == {"name": "pair", "command": ["sleep", "60"], "num_processes": 2,
                    "device_ids": [0, 1], "env": {}, "working_dir": None, "estimated_cost": None}
    missing = await api.get("/api/configs/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert (await api.get("/api/configs/broken")).status_code == 422


async def test_put_writes_toml_that_reads_back_and_submits(api, data_dir) -> None:
    body = {"command": ["python", "train.py", "--lr", "1e-4", 'quote " and \\ back'],
            "num_processes": 2, "device_ids": [2, 3], "env": {"WANDB_MODE": "offline"},
            "working_dir": "/srv/exp", "estimated_cost": 12.5}
    response = await api.client.put("/api/configs/train-v2", json=body)
    assert response.status_code == 200
    assert response.json() == {"name": "train-v2", **body}
    on_disk = tomllib.loads((data_dir / "configs" / "train-v2.toml").read_text())
    assert on_disk == body
    assert [p.name for p in (data_dir / "configs").iterdir() if p.name.startswith(".")] == []
    job = await api.submit_ok("train-v2")
    assert api.state.jobs[job["job_id"]].spec.device_ids == (2, 3)
    replaced = await api.client.put("/api/configs/train-v2", json={"command": ["true"]})
    assert replaced.json()["num_processes"] == 1  # the default, shown as what it resolves to
    ids_only = await api.client.put("/api/configs/ids-only", json={"command": ["true"],
                                                                   "device_ids": [1, 3]})
    assert ids_only.json()["num_processes"] == 2  # as many as device_ids names
    on_disk = tomllib.loads((data_dir / "configs" / "ids-only.toml").read_text())
    assert "num_processes" not in on_disk  # the file keeps what was given
    assert (await api.get("/api/configs/train-v2")).json()["command"] == ["true"]


def test_a_name_with_a_trailing_newline_is_not_a_name() -> None:
    assert check_name("train-v2") == "train-v2"
    with pytest.raises(InvalidRequest, match="not valid"):
        check_name("train\n")  # `$` alone would let it through


@pytest.mark.parametrize(("name", "body", "words"), [
    ("ok", {"command": []}, "command"),
    ("ok", {"command": [""]}, "command"),
    ("ok", {"command": ["x"], "num_processes": -1}, "num_processes"),
    ("ok", {"command": ["x"], "device_ids": [1, 1]}, "twice"),
    ("ok", {"command": ["x"], "env": {"BAD NAME": "1"}}, "env"),
    ("ok", {"command": ["x"], "working_dir": "exp/run1"}, "working_dir must be an absolute"),
    ("ok", {"command": ["x"], "working_dir": "~/exp"}, "working_dir must be an absolute"),
    ("ok", {"command": ["x"], "working_dir": ""}, "working_dir"),
    ("ok", {"command": ["./train.sh"]}, "is a relative path and there is no working_dir"),
    ("ok", {"command": ["bin/train"]}, "is a relative path and there is no working_dir"),
    ("ok", {"command": ["x"], "comand": ["y"]}, "comand"),
    ("ok", {"num_processes": 1}, "command"),
    (".hidden", {"command": ["x"]}, "not valid"),
    ("a" * 101, {"command": ["x"]}, "not valid"),
    ("x.toml", {"command": ["x"]}, "not ending in '.toml'"),  # the rule names why
])
async def test_bad_configs_are_422(api, data_dir, name, body, words) -> None:
    response = await api.client.put(f"/api/configs/{name}", json=body)
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]
    assert not (data_dir / "configs" / f"{name}.toml").exists()


def test_config_store_sees_file_edits_when_it_looks_again(tmp_path) -> None:
    store = ConfigStore(tmp_path, recheck_seconds=0)
    with pytest.raises(UnknownConfig):
        store.get("train")
    (tmp_path / "train.toml").write_text('command = ["a"]\n')
    assert store.get("train").command == ["a"]
    (tmp_path / "train.toml").write_text('command = ["b", "c"]\n')
    assert store.get("train").command == ["b", "c"]
    (tmp_path / "train.toml").write_text("command = 1\n")
    with pytest.raises(InvalidRequest, match="train.toml"):
        store.get("train")
    (tmp_path / "train.toml").unlink()
    with pytest.raises(UnknownConfig):
        store.get("train")


def test_config_store_lists_only_names_it_can_fetch(tmp_path) -> None:
    (tmp_path / "train.toml").write_text('command = ["a"]\n')
    (tmp_path / "odd.toml.toml").write_text('command = ["a"]\n')  # name "odd.toml": refused
    (tmp_path / "-dash.toml").write_text('command = ["a"]\n')
    store = ConfigStore(tmp_path)
    assert store.names() == ["train"]
    with pytest.raises(UnknownConfig):
        store.get("odd.toml")


def test_config_store_looks_at_most_once_per_interval_but_put_is_seen_at_once(tmp_path) -> None:
    store = ConfigStore(tmp_path, recheck_seconds=3600)
    (tmp_path / "train.toml").write_text('command = ["a"]\n')
    assert store.get("train").command == ["a"]
    (tmp_path / "train.toml").write_text('command = ["edited"]\n')
    assert store.get("train").command == ["a"]  # not looked at again yet
    store.put("train", ConfigSpec(command=["put"]))
    assert store.get("train").command == ["put"]


def export_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


async def test_audit_export_jsonl_every_event_and_a_chain_that_verifies(api) -> None:
    await api.make_users("admin", "researcher")
    job = await api.submit_ok("cpu", "researcher")
    other = await api.submit_ok("cpu", "admin")
    await api.post(f"/api/queue/{other['job_id']}/cancel", who="admin")
    await api.wait_started(job["job_id"])  # its job.started, then nothing more comes
    response = await api.get("/api/audit/export", "admin")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = export_lines(response.text)
    assert [line["seq"] for line in lines] == list(range(1, api.state.last_seq + 1))
    assert set(lines[0]) == {"seq", "at", "type", "actor", "correlation_id", "causation_id",
                             "data", "hash"}
    assert verify_rows([row_from_export(line) for line in lines]) == len(lines)
    submitted = [line for line in lines if line["type"] == "job.submitted"]
    assert submitted[0]["data"]["job_id"] == job["job_id"]
    assert submitted[0]["actor"] == f"user:{api.user_ids['researcher']}:researcher"


async def test_audit_export_csv(api) -> None:
    await api.submit_ok("cpu")
    response = await api.get("/api/audit/export", format="csv")
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == ["seq", "at", "type", "actor", "correlation_id", "causation_id",
                             "data", "hash"]
    assert verify_rows([row_from_export(row) for row in rows]) == len(rows)


async def test_the_api_and_the_cli_write_an_export_with_the_same_bytes(api) -> None:
    await api.submit_ok("cpu")
    await api.submit_ok("cpu", requires_approval=True)
    for fmt in ("jsonl", "csv"):
        served = (await api.get("/api/audit/export", format=fmt)).content
        # the running job may log more events after the request: compare the same prefix
        last = served.decode().strip().splitlines()[-1]
        last_seq = json.loads(last)["seq"] if fmt == "jsonl" else int(last.split(",", 1)[0])
        written = io.BytesIO()  # what `gpuyard audit export --db` writes
        write_export(api.runtime.event_log.rows(until_seq=last_seq), written, fmt)
        assert served == written.getvalue(), fmt


async def test_audit_export_filters(api) -> None:
    await api.make_users("admin", "researcher", "viewer")
    mine = (await api.submit_ok("cpu", "researcher"))["job_id"]
    theirs = (await api.submit_ok("cpu", "viewer"))["job_id"]
    await api.post(f"/api/queue/{theirs}/cancel", who="admin")
    await api.wait_started(mine)  # its job.started, then nothing more comes
    everything = export_lines((await api.get("/api/audit/export", "admin")).text)

    by_job = export_lines((await api.get("/api/audit/export", "admin", job_id=theirs)).text)
    assert [line["type"] for line in by_job] == ["job.submitted", "job.cancelled"]

    by_type = export_lines((await api.get("/api/audit/export", "admin",
                                          type="user.created")).text)
    assert [line["data"]["name"] for line in by_type] == ["admin", "researcher", "viewer"]
    prefix = export_lines((await api.get("/api/audit/export", "admin", type="job.")).text)
    assert prefix and all(line["type"].startswith("job.") for line in prefix)

    user_id = api.user_ids["researcher"]
    by_user = export_lines((await api.get("/api/audit/export", "admin", user_id=user_id)).text)
    assert {"user.created", "token.issued", "job.submitted", "job.dispatched"} <= {
        line["type"] for line in by_user}
    assert all(theirs not in json.dumps(line["data"]) for line in by_user)
    assert any(line["data"].get("job_id") == mine for line in by_user)

    middle = everything[len(everything) // 2]
    after = export_lines((await api.get("/api/audit/export", "admin",
                                        after_seq=middle["seq"])).text)
    assert [line["seq"] for line in after] == [line["seq"] for line in everything
                                               if line["seq"] > middle["seq"]]
    since_iso = datetime.fromtimestamp(middle["at"], UTC).isoformat()
    since = export_lines((await api.get("/api/audit/export", "admin", since=since_iso)).text)
    assert since and all(line["at"] >= middle["at"] - 1e-6 for line in since)
    until = export_lines((await api.get("/api/audit/export", "admin",
                                        until=str(middle["at"]))).text)
    assert until and all(line["at"] <= middle["at"] for line in until)
    future = export_lines((await api.get("/api/audit/export", "admin",
                                         since=str(time.time() + 3600))).text)
    assert future == []


@pytest.mark.parametrize("params", [
    {"since": "yesterday"}, {"until": "2024-13-40"}, {"format": "xml"}, {"after_seq": -1},
    {"since": "nan"},
])
async def test_bad_export_parameters_are_422(api, params) -> None:
    response = await api.get("/api/audit/export", **params)
    assert response.status_code == 422, response.text
    assert list(params)[0] in response.json()["detail"]
