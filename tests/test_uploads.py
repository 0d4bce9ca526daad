"""Nothing uploaded outlives its TTL or the server: the private upload folder's whole life."""

from __future__ import annotations

import os
import signal
import threading
import time

from conftest import start_app
from gradio_client import handle_file

from mura_demo.serving.uploads import (
    PRIVATE_PREFIX,
    lock_folder,
    new_private_folder,
    remove_abandoned_folders,
    run_every,
    sweep_uploads,
)


def test_sweep_removes_only_old_files(tmp_path):
    old, new = tmp_path / "a" / "old.png", tmp_path / "new.png"
    filling = tmp_path / "b"  # Gradio made it and is about to write the upload into it
    old.parent.mkdir()
    filling.mkdir()
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    for path in (old, old.parent):
        os.utime(path, (time.time() - 120, time.time() - 120))
    assert sweep_uploads(tmp_path, 60) == 1
    assert not old.parent.exists() and new.exists()  # the emptied sub-folder goes too
    assert filling.is_dir()  # an empty folder younger than the TTL stays
    assert sweep_uploads(tmp_path, 0) == 1 and list(tmp_path.iterdir()) == []


def test_a_failed_sweep_does_not_end_the_sweeper():
    rounds, again = [], threading.Event()

    def sweep():
        rounds.append(1)
        if len(rounds) == 1:
            raise OSError("the folder went away")
        again.set()
        threading.Event().wait()  # park the daemon thread for the rest of the session

    run_every(0.01, sweep, "test-sweeper")
    assert again.wait(5)


def test_only_abandoned_folders_are_removed(tmp_path):
    live, fd = new_private_folder(tmp_path)
    assert live.name.startswith(PRIVATE_PREFIX) and lock_folder(live) is None  # held while its server lives
    dead = tmp_path / f"{PRIVATE_PREFIX}killed"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "upload.png").write_bytes(b"x")
    other = tmp_path / "someone-elses-folder"
    other.mkdir()
    assert remove_abandoned_folders(tmp_path) == [dead]
    assert live.exists() and other.exists() and not dead.exists()
    os.close(fd)  # the server is gone: its folder is abandoned now
    assert remove_abandoned_folders(tmp_path) == [live]


def private_folders(base):
    return sorted(base.glob(PRIVATE_PREFIX + "*"))


def holds(folder, data: bytes) -> bool:
    return any(p.is_file() and p.read_bytes() == data for p in folder.rglob("*"))


def test_no_upload_outlives_the_server(tmp_path, images):
    """A killed server's uploads are removed by the next server; a stopped server removes its own."""
    path = images["b"]
    data = path.read_bytes()
    env = {"TMPDIR": str(tmp_path), "GRADIO_TEMP_DIR": "", "MURA_DEMO_UPLOAD_TTL": "600"}

    killed, client, _ = start_app(env, tmp_path / "killed.log")
    client.predict(handle_file(str(path)), "auto", api_name="/predict")
    [folder] = private_folders(tmp_path)
    assert holds(folder, data)
    killed.kill()  # no chance to clean up
    killed.wait(timeout=30)
    assert holds(folder, data)

    server, client, _ = start_app(env, tmp_path / "server.log")
    assert folder not in private_folders(tmp_path), "the killed server's uploads are still on disk"
    client.predict(handle_file(str(path)), "auto", api_name="/predict")
    [folder] = private_folders(tmp_path)
    assert holds(folder, data)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-2000:]
    assert private_folders(tmp_path) == []
    assert not holds(tmp_path, data)
