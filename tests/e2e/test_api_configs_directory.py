"""The configs directory when it is not what it should be: gone, replaced by a file, not
readable or writable by the server's user; entries that are not files; a file fixed by
``chmod`` (which changes only its ctime). Never a 500: a missing directory is empty and a
PUT creates it again; a directory the server cannot use is a 503 naming it and the OS
error; a ``<name>.toml`` that cannot be used is a 422, and listed under ``invalid``.

Permission cases need a user that ``chmod`` binds: as root they run a real server as user
``nobody`` (``setpriv``), and are skipped with the reason where that cannot work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_harness import write_configs
from serverproc import REPO_ROOT, ServerProcess

from service.commands import ConfigSpec, InvalidRequest, UnknownConfig
from service.configs import ConfigStore, ConfigsUnavailable

pytestmark = pytest.mark.anyio

GOOD = 'command = ["sleep", "60"]\nnum_processes = 0\n'


# ---------------------------------------------------------------- the store, on real files


def test_a_missing_directory_holds_no_configs_and_a_put_creates_it(tmp_path) -> None:
    directory = tmp_path / "configs"
    store = ConfigStore(directory, recheck_seconds=0)
    (directory / "cpu.toml").write_text(GOOD)
    assert store.get("cpu").command == ["sleep", "60"]
    shutil.rmtree(directory)
    assert store.names() == []
    with pytest.raises(UnknownConfig, match="cpu"):
        store.get("cpu")
    assert store.put("new", ConfigSpec(command=["true"])).command == ["true"]
    assert directory.is_dir() and store.names() == ["new"]


def test_a_directory_replaced_by_a_file_is_unavailable_naming_it(tmp_path) -> None:
    directory = tmp_path / "configs"
    store = ConfigStore(directory, recheck_seconds=0)
    (directory / "cpu.toml").write_text(GOOD)
    store.get("cpu")  # cached: the next look must not answer from the cache
    shutil.rmtree(directory)
    directory.write_text("not a directory\n")
    for attempt in (store.names, lambda: store.get("cpu"),
                    lambda: store.put("new", ConfigSpec(command=["true"]))):
        with pytest.raises(ConfigsUnavailable) as caught:
            attempt()
        assert str(directory) in caught.value.detail
        assert "Not a directory" in caught.value.detail
    assert directory.read_text() == "not a directory\n"  # the put left it as it was


def test_a_content_change_that_keeps_size_and_mtime_is_seen(tmp_path) -> None:
    """What ``chmod`` does to the cache key: only the ctime moves (a rewrite in place of
    the same size with the old mtime put back changes the ctime too, and root can do it)."""
    path = tmp_path / "train.toml"
    path.write_text('command = ["aaa"]\n')
    store = ConfigStore(tmp_path, recheck_seconds=0)
    assert store.get("train").command == ["aaa"]
    before = os.stat(path)
    path.write_text('command = ["bbb"]\n')  # same size, same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    while os.stat(path).st_ctime_ns == before.st_ctime_ns:  # coarse clock: let it move
        time.sleep(0.005)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)
    assert store.get("train").command == ["bbb"]


def test_entries_that_are_not_files_are_listed_and_say_why(tmp_path) -> None:
    (tmp_path / "good.toml").write_text(GOOD)
    (tmp_path / "dangling.toml").symlink_to(tmp_path / "elsewhere.toml")
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "loop.toml").symlink_to(tmp_path / "loop.toml")
    os.mkfifo(tmp_path / "pipe.toml")  # reading it would block for good
    (tmp_path / "linked.toml").symlink_to(tmp_path / "good.toml")
    store = ConfigStore(tmp_path, recheck_seconds=0)
    assert store.names() == ["dangling", "folder", "good", "linked", "loop", "pipe"]
    assert store.get("linked") == store.get("good")
    reasons = {"dangling": "symbolic link to", "folder": "is a directory",
               "loop": "cannot be read", "pipe": "not a regular file"}
    for name, words in reasons.items():
        with pytest.raises(InvalidRequest) as caught:
            store.get(name)
        assert words in caught.value.detail and f"{name}.toml" in caught.value.detail
    (tmp_path / "elsewhere.toml").write_text(GOOD)  # the link leads somewhere now
    assert store.get("dangling").command == ["sleep", "60"]


# ---------------------------------------------------------------- over HTTP, in process


async def test_http_a_missing_directory_is_empty_and_a_put_brings_it_back(api, data_dir) -> None:
    shutil.move(data_dir / "configs", data_dir.parent / "configs-moved")
    listing = await api.get("/api/configs")
    assert listing.status_code == 200 and listing.json() == {"configs": [], "invalid": []}
    assert (await api.get("/api/configs/cpu")).status_code == 404
    submitted = await api.submit("cpu")
    assert submitted.status_code == 404 and "cpu" in submitted.json()["detail"]
    written = await api.client.put("/api/configs/newone", json={"command": ["true"]})
    assert written.status_code == 200, written.text
    assert (data_dir / "configs" / "newone.toml").is_file()
    assert [c["name"] for c in (await api.get("/api/configs")).json()["configs"]] == ["newone"]
    await api.submit_ok("newone", num_processes=0)


async def test_http_a_directory_replaced_by_a_file_is_503_with_a_detail(api, data_dir) -> None:
    configs = data_dir / "configs"
    shutil.move(configs, data_dir.parent / "configs-moved")
    configs.write_text("oops\n")
    seq = api.state.last_seq
    answers = [await api.get("/api/configs"), await api.get("/api/configs/cpu"),
               await api.client.put("/api/configs/newone", json={"command": ["true"]}),
               await api.submit("cpu")]
    for response in answers:
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert str(configs) in detail and "Not a directory" in detail, detail
    assert api.state.last_seq == seq  # nothing was queued
    assert configs.read_text() == "oops\n"
    configs.unlink()
    shutil.move(data_dir.parent / "configs-moved", configs)
    assert (await api.get("/api/configs/cpu")).status_code == 200


async def test_http_the_listing_shows_what_a_single_read_refuses(api, data_dir) -> None:
    configs = data_dir / "configs"
    (configs / "x.toml").symlink_to(data_dir / "nowhere.toml")
    (configs / "y.toml").mkdir()
    listing = (await api.get("/api/configs")).json()
    invalid = {bad["name"]: bad["error"] for bad in listing["invalid"]}
    assert sorted(invalid) == ["x", "y"]
    for name in ("x", "y"):
        single = await api.get(f"/api/configs/{name}")
        assert single.status_code == 422
        assert single.json()["detail"] == invalid[name]
    assert "symbolic link" in invalid["x"] and "is a directory" in invalid["y"]
    refused = await api.client.put("/api/configs/y", json={"command": ["true"]})
    assert refused.status_code == 409 and "is a directory" in refused.json()["detail"]
    assert (configs / "y.toml").is_dir()
    assert [p.name for p in configs.iterdir() if p.name.startswith(".")] == []
    replaced = await api.client.put("/api/configs/x", json={"command": ["true"]})
    assert replaced.status_code == 200  # the file takes the dangling link's place


# ---------------------------------------------------------------- permissions, real server

NOBODY = 65534


def _unprivileged_prefix() -> list[str]:
    """How to run the server as a user that ``chmod`` binds, or skip saying why not."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, where chmod does not stop reads, and setpriv is "
                    "missing: cannot run the server as an unprivileged user")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import service.cli"], check=False,
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("running as root, where chmod does not stop reads, and user nobody "
                    f"cannot run this checkout's Python: {probe.stderr.strip()[-300:]}")
    return prefix


class UnprivilegedServer(ServerProcess):
    """``gpuyard serve`` run through ``prefix`` (setpriv to nobody when we are root)."""

    def __init__(self, data_dir: Path, prefix: list[str]) -> None:
        super().__init__(data_dir, gpus="4xA100:40")
        self.prefix = prefix

    def argv(self) -> list[str]:
        return [*self.prefix, *super().argv()]


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[tuple[UnprivilegedServer, Path]]:
    prefix = _unprivileged_prefix()
    # a directory of its own that nobody can enter (pytest's tmp_path is root's alone)
    top = Path(tempfile.mkdtemp(prefix="gpuyard-configs-"))
    try:
        top.chmod(0o755)
        data_dir = top / "data"
        write_configs(data_dir)
        if prefix:
            for path in [data_dir, *data_dir.rglob("*")]:
                os.chown(path, NOBODY, NOBODY)
        server = UnprivilegedServer(data_dir, prefix)
        server.start()
        try:
            yield server, data_dir / "configs"
        finally:
            server.stop(kill_jobs=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.slow
def test_an_unreadable_or_unwritable_directory_is_503_never_500_nor_404(unprivileged) -> None:
    server, configs = unprivileged
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        try:
            configs.chmod(0o000)
            answers = [client.post("/api/queue/submit", json={"config_name": "cpu"}),
                       client.get("/api/configs"), client.get("/api/configs/cpu"),
                       client.put("/api/configs/newone", json={"command": ["true"]})]
            for response in answers:
                assert response.status_code == 503, response.text
                detail = response.json()["detail"]
                assert str(configs) in detail and "Permission denied" in detail, detail
            configs.chmod(0o555)  # readable, not writable
            refused = client.put("/api/configs/newone", json={"command": ["true"]})
            assert refused.status_code == 503, refused.text
            assert "Permission denied" in refused.json()["detail"]
            assert client.get("/api/configs/cpu").status_code == 200
            assert [p.name for p in configs.iterdir() if p.name.startswith(".")] == []
        finally:
            configs.chmod(0o755)
        assert client.put("/api/configs/newone", json={"command": ["true"]}).status_code == 200
        assert client.post("/api/queue/submit",
                           json={"config_name": "cpu"}).status_code == 201


@pytest.mark.slow
def test_a_file_fixed_by_chmod_is_read_again(unprivileged) -> None:
    server, configs = unprivileged
    quick = configs / "quick.toml"
    quick.write_text(GOOD)
    if os.geteuid() == 0:
        os.chown(quick, NOBODY, NOBODY)
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        try:
            quick.chmod(0o000)
            refused = client.get("/api/configs/quick")
            assert refused.status_code == 422 and "Permission denied" in refused.json()["detail"]
            listing = client.get("/api/configs").json()
            assert [bad["name"] for bad in listing["invalid"]] == ["quick"]
        finally:
            quick.chmod(0o644)  # only the ctime changes
        deadline = time.monotonic() + 15.0  # the server looks again after its 1 s interval
        while (answer := client.get("/api/configs/quick")).status_code != 200:
            assert answer.status_code == 422, answer.text
            assert time.monotonic() < deadline, f"still refused after chmod: {answer.text}"
            time.sleep(0.1)
        assert answer.json()["command"] == ["sleep", "60"]
