"""A real one-machine Slurm cluster for tests: slurmctld plus two slurmd "nodes" n1 and n2 (see
slurm/testing/cluster.sh, which installs Slurm from Debian's packages when it is missing).

    import pytest

    from tests.slurm_cluster import slurm_cluster_fixture  # noqa: F401 (registers `slurm_cluster`)

    pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

    def test_job(slurm_cluster):
        job = slurm_cluster.sbatch(["--wrap", "hostname"])
        assert slurm_cluster.wait([job]) == {str(job): "COMPLETED"}

One cluster at a time per machine: `running_cluster` holds an fcntl lock on LOCK_PATH from start
to stop. Under xdist (-n auto) each worker has its own session, so a second worker that wants the
cluster waits until the first worker's session ends (no deadlock: the holder never waits for the
waiter). With `--dist loadgroup`, the `xdist_group("slurm")` mark sends all Slurm tests to one
worker, so nobody waits. The lock is re-entrant within a process, so a test can start a private
cluster of its own while the session's one runs (the ports are chosen free; munged is shared).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parents[1] / "slurm" / "testing" / "cluster.sh"
LOCK_PATH = Path("/tmp/seg-slurm-cluster.lock")
# The directories of clusters started and not yet stopped: a test process killed before its
# teardown leaves its daemons running, and the next holder of the lock stops them.
REGISTRY = Path("/tmp/seg-slurm-clusters")
LOCK_TIMEOUT_S = 3600.0
# States after which a job (or an array task) never runs again.
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
# The daemons' pid files in the cluster's directory, and the program each pid must be.
PID_FILES = {
    "slurmctld.pid": "slurmctld",
    "slurmd.n1.pid": "slurmd",
    "slurmd.n2.pid": "slurmd",
    "munged.started": "munged",
}


class SlurmCluster:
    """A started cluster: its directory, its slurm.conf, an environment for the Slurm clients."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conf = directory / "slurm.conf"
        # Drop Slurm variables inherited from a job pytest may itself run in: sbatch and srun read them.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env = {**env, "SLURM_CONF": str(self.conf)}

    def run(self, args: list[str], env: dict[str, str] | None = None, check: bool = True) -> str:
        """Run a Slurm client (`scontrol`, `squeue`...) against this cluster; return its stdout."""
        env = {**(env or self.env), "SLURM_CONF": str(self.conf)}
        done = subprocess.run(args, env=env, cwd=self.dir, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{args} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, args: list[str], env: dict[str, str] | None = None) -> int:
        """Submit a job; its id. The job inherits `env` (default: self.env); its output goes to
        self.dir unless args say otherwise (-o, --chdir)."""
        return int(self.run(["sbatch", "--parsable", *args], env=env).split(";")[0])

    def release(self, job_id: int | str) -> None:
        """Start a requeued job in two seconds rather than after its two-minute BeginTime delay.

        Not at once: the requeue revoked the job's credential as of the requeue's second, and
        slurmd refuses a launch whose credential is from that second or before ("Job N already
        killed, do not launch batch job"), which fails the job. The delay Slurm sets (its
        credential lifetime) is there to let that revocation expire; a later second is enough.
        """
        self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+2"])

    def states(self, job_ids: Iterable[int | str]) -> dict[str, str]:
        """The state of each job, or of each task of an array job: keys "12" or "12_0", "12_1"...

        Finished jobs leave squeue after MinJobAge; the jobcomp file keeps them. The jobcomp file
        is read first and squeue overrides it: a requeued job has a stale PENDING record there.
        """
        ids = {str(j) for j in job_ids}
        states = {}
        jobcomp = self.dir / "jobcomp.txt"
        for line in jobcomp.read_text().splitlines() if jobcomp.exists() else []:
            record = dict(field.split("=", 1) for field in line.split() if "=" in field)
            if record.get("ArrayJobId") in ids:
                states[f"{record['ArrayJobId']}_{record['ArrayTaskId']}"] = record["JobState"]
            elif record.get("JobId") in ids and "ArrayJobId" not in record:
                states[record["JobId"]] = record["JobState"]
        # -r: one line per array task; %F is the array's id (a plain job's own id); %i is "12_0" or "13".
        queue = self.run(["squeue", "-h", "-r", "-t", "all", "-o", "%F|%i|%T"], check=False)
        for line in queue.splitlines():
            array_id, key, state = line.split("|")
            if array_id in ids:
                states[key] = state
        return states

    def wait(self, job_ids: Iterable[int | str], timeout: float = 60.0) -> dict[str, str]:
        """Wait until every job (every task of an array job) has finished; the final states, keyed
        as in `states`. TimeoutError, with the states and the controller log's tail, if not."""
        ids = {str(j) for j in job_ids}
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(ids)
            seen = {key.split("_")[0] for key in states}
            if seen == ids and set(states.values()) <= FINISHED:
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {sorted(ids)} not finished after {timeout} s: {states}\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 20) -> str:
        tails = []
        for log in sorted(self.dir.glob("*.log")):
            tails.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def daemons(self) -> dict[int, str]:
        """pid -> program, for the daemons that this cluster's pid files name."""
        found = {}
        for name, program in PID_FILES.items():
            with contextlib.suppress(FileNotFoundError, ValueError):
                found[int((self.dir / name).read_text())] = program
        return found


def alive(pid: int, program: str) -> bool:
    """Whether `pid` runs `program` (a pid reused by something else doesn't count)."""
    try:
        return program in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False


def processes_mentioning(text: str) -> list[str]:
    """Command lines that contain `text`: daemons started with `-f DIR/slurm.conf`, pid files aside."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in line:
                found.append(f"{cmdline.parent.name}: {line}")
    return found


_lock_depth = 0
_lock_fd = -1


@contextlib.contextmanager
def machine_lock(timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold LOCK_PATH (re-entrant within this process; released if the process dies)."""
    global _lock_depth, _lock_fd
    if _lock_depth == 0:
        fd = os.open(LOCK_PATH, os.O_RDONLY | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"another Slurm test cluster held {LOCK_PATH} for {timeout} s") from None
                time.sleep(0.5)
        _lock_fd = fd
        stop_stale_clusters()  # nobody else holds the lock: whatever is registered is stale
    _lock_depth += 1
    try:
        yield
    finally:
        _lock_depth -= 1
        if _lock_depth == 0:
            os.close(_lock_fd)  # closing releases the lock


def stop_stale_clusters() -> None:
    for directory in REGISTRY.read_text().split("\n") if REGISTRY.exists() else []:
        if directory and Path(directory).is_dir():
            subprocess.run(["bash", str(CLUSTER_SH), "stop", directory], capture_output=True, timeout=120)
    REGISTRY.unlink(missing_ok=True)


def _register(directory: Path, present: bool) -> None:
    listed = [d for d in (REGISTRY.read_text().split("\n") if REGISTRY.exists() else []) if d and d != str(directory)]
    REGISTRY.write_text("\n".join([*listed, *([str(directory)] if present else [])]) + "\n")


def slurm_missing_reason() -> str | None:
    """Why no cluster can be had here, or None: only when Slurm is missing and we can't install it."""
    sbin = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    if os.geteuid() != 0 and not all(shutil.which(p, path=sbin) for p in ("slurmctld", "slurmd", "munged")):
        return "Slurm (slurm-wlm, munge) is not installed and installing it needs root"
    return None


def cluster_dir(directory: Path) -> Path:
    """`directory`, unless it is too long for slurmd's unix sockets (DIR/spool/n1/n1_<job>.<step>,
    107 characters at most): then a fresh directory in /tmp instead, left behind like pytest's."""
    return directory if len(str(directory)) <= 70 else Path(tempfile.mkdtemp(prefix="seg-slurm-", dir="/tmp"))


def _cluster_sh(*args: str) -> str:
    done = subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"cluster.sh {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


@contextlib.contextmanager
def running_cluster(directory: Path) -> Iterator[SlurmCluster]:
    """Install Slurm if needed, start a cluster in `directory`, stop it on exit and check that none
    of its daemons is left."""
    with machine_lock():
        _cluster_sh("install")
        directory.mkdir(parents=True, exist_ok=True)
        cluster = SlurmCluster(directory.resolve())
        try:
            _register(cluster.dir, True)
            _cluster_sh("start", str(cluster.dir))
            yield cluster
        finally:
            daemons = cluster.daemons()  # before stop, which removes the pid files
            _cluster_sh("stop", str(cluster.dir))
            _register(cluster.dir, False)
            left = [f"{pid}: {program}" for pid, program in daemons.items() if alive(pid, program)]
            left += processes_mentioning(str(cluster.conf))
            assert not left, f"daemons of {cluster.dir} still run after stop: {left}"


# name=: test modules import `slurm_cluster_fixture`, so their `slurm_cluster` arguments shadow nothing.
@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The session's cluster (one per xdist worker, one at a time per machine; see the module doc)."""
    reason = slurm_missing_reason()
    if reason:
        pytest.skip(reason)
    with running_cluster(cluster_dir(tmp_path_factory.mktemp("slurm"))) as cluster:
        yield cluster
