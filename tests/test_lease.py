"""seg/core/lease.py: one writer per folder, a holder that is gone taken over, a requeue reclaiming its own."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from seg.core import lease
from seg.core.lease import LeaseHeldError, acquire, clear_if_gone


def _holder(path, **changes) -> dict:
    record = json.loads(path.read_text())
    record.update(changes)
    return record


def _plant(path, record: dict, age: float = 0.0) -> None:
    """A lease left by someone else, its heartbeat ``age`` seconds old."""
    path.write_text(json.dumps(record) + "\n")
    then = time.time() - age
    os.utime(path, (then, then))


@pytest.fixture
def live_process():
    """Another live process of this host (the holder of a planted lease)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_holder_and_the_released_lease_is_free(tmp_path):
    path = tmp_path / "fold0" / ".lease"
    with acquire(path, "training of stage 1 fold 0") as held:
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(LeaseHeldError) as refused:
            acquire(path, "training of stage 1 fold 0")
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and str(path) in message
        assert "training of stage 1 fold 0" in message and "last heartbeat" in message
        assert held.lost is None
    assert not path.exists()
    acquire(path, "again").release()  # free once released
    assert sorted(p.name for p in path.parent.iterdir()) == []  # no temporary files left


def test_a_lease_of_a_dead_pid_on_this_host_is_taken_over_saying_so(tmp_path, capsys):
    path = tmp_path / ".lease"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(path, lease._me("training of stage 1 fold 0") | {"pid": int(dead.stdout)})
    with acquire(path, "mine") as held:
        assert json.loads(path.read_text())["token"] == held.record["token"]
    said = capsys.readouterr().out
    assert "taking over the lease" in said and f"pid {int(dead.stdout)} is not running on this host" in said


def test_a_finished_writer_s_lease_is_cleared_once_its_holder_is_gone_and_a_live_one_is_kept(tmp_path, live_process):
    """Found by tools/chaos.py: a fold killed after its last write (summary.json) but before
    releasing its lease left it; nothing takes a finished fold's lease again."""
    path = tmp_path / ".lease"
    assert clear_if_gone(path) is None  # none there
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant(path, lease._me("training of stage 2 fold 0") | {"pid": int(dead.stdout)})
    line = clear_if_gone(path)
    assert line and "removed the lease of training of stage 2 fold 0" in line and "is not running" in line
    assert list(tmp_path.iterdir()) == []
    started = __import__("psutil").Process(live_process.pid).create_time()
    _plant(path, lease._me("x") | {"pid": live_process.pid, "pid_started": started})
    assert clear_if_gone(path) is None and path.exists()
    _plant(path, lease._me("x") | {"host": "node-elsewhere", "pid": 1}, age=lease.STALE_S / 2)
    assert clear_if_gone(path) is None and path.exists()  # another host's: alive until STALE_S without a beat
    _plant(path, lease._me("x") | {"host": "node-elsewhere", "pid": 1}, age=lease.STALE_S + 5)
    assert "no heartbeat for" in (clear_if_gone(path) or "") and not path.exists()


def test_a_reused_pid_is_not_the_holder(tmp_path, capsys, live_process):
    path = tmp_path / ".lease"
    _plant(path, lease._me("x") | {"pid": live_process.pid, "pid_started": time.time() - 3600})
    acquire(path, "mine").release()
    assert f"pid {live_process.pid} is another process now" in capsys.readouterr().out


def test_a_live_holder_on_this_host_is_refused_however_old_its_heartbeat(tmp_path, live_process):
    path = tmp_path / ".lease"
    started = __import__("psutil").Process(live_process.pid).create_time()
    _plant(path, lease._me("x") | {"pid": live_process.pid, "pid_started": started}, age=10 * lease.STALE_S)
    with pytest.raises(LeaseHeldError, match=f"pid {live_process.pid}"):
        acquire(path, "mine")


def test_a_holder_on_another_host_is_refused_while_it_beats_and_taken_over_when_it_stops(tmp_path, capsys):
    path = tmp_path / ".lease"
    other = lease._me("training of stage 1 fold 0") | {"host": "node-elsewhere", "pid": 1}
    _plant(path, other, age=lease.STALE_S / 2)
    with pytest.raises(LeaseHeldError, match="host node-elsewhere"):
        acquire(path, "mine")
    _plant(path, other, age=lease.STALE_S + 5)
    acquire(path, "mine").release()
    assert "no heartbeat for" in capsys.readouterr().out


def test_a_requeued_slurm_job_reclaims_its_own_lease_at_once(tmp_path, monkeypatch, capsys):
    path = tmp_path / ".lease"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    # the first run of the job, on another node, killed without releasing (a fresh heartbeat)
    _plant(path, lease._me("training") | {"host": "node-elsewhere"})
    with pytest.raises(LeaseHeldError, match="Slurm job 4242"):
        acquire(path, "mine")  # the same run of the job (no requeue): not ours to take
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    acquire(path, "mine").release()
    assert "Slurm job 4242 was requeued (restart 1)" in capsys.readouterr().out


def test_the_heartbeat_keeps_the_lease_fresh_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    path = tmp_path / ".lease"
    held = acquire(path, "mine")
    try:
        os.utime(path, (0, 0))
        deadline = time.time() + 10
        while path.stat().st_mtime < time.time() - 60 and time.time() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime > time.time() - 60  # touched again
        _plant(path, held.record | {"token": "someone-else"})
        while held.lost is None and time.time() < deadline:
            time.sleep(0.05)
        assert held.lost and "taken over" in held.lost
    finally:
        held.release()
    assert path.exists()  # not ours any more: left to its holder


def test_leases_are_readable_by_the_team(tmp_path):
    path = tmp_path / ".lease"
    old = os.umask(0o022)
    try:
        with acquire(path, "mine"):
            assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
