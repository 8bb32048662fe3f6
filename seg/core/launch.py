"""How seg starts processes: the local launch command, its rendezvous port, and the check
that a launcher started as many processes as it was asked for."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free on this machine now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int) -> list[str]:
    """The command prefix that runs a script in ``processes`` local processes.

    Several processes go through ``accelerate launch --multi_gpu``: that selects accelerate's
    torchrun launcher, on GPUs and CPUs alike (its ``--cpu`` path starts one process unless
    MPI is set up); the scripts themselves tell accelerate to use the CPU when there is no
    CUDA.
    """
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]  # fmt: skip


def launcher_problem() -> str | None:
    """Why this one process is not what its launcher was asked for, or None.

    ``accelerate launch --num_processes N`` without ``--multi_gpu``, on a machine with fewer
    than two GPUs, starts the script as one plain process (accelerate's simple launcher) and
    sets nothing in its environment that says N: only the launcher's command line, our parent
    process's, does. Linux only (/proc); elsewhere nothing is checked.
    """
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    rest = None
    for i, arg in enumerate(argv):
        name = Path(arg).name
        if name in ("accelerate.commands.launch", "accelerate-launch") or (
            arg == "launch" and i > 0 and Path(argv[i - 1]).name == "accelerate"
        ):
            rest = argv[i + 1 :]
            break
    if rest is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        asked = launch_command_parser().parse_known_args(rest)[0].num_processes
    except SystemExit:  # not a command line accelerate itself would take
        return None
    if not asked or asked < 2:
        return None
    return (
        f"accelerate launch --num_processes {asked} started this script as 1 process: without --multi_gpu "
        f"it runs one process on a machine with fewer than 2 GPUs. Add --multi_gpu (it starts {asked} "
        f"processes, over gloo on a CPU), or use torchrun --nproc_per_node {asked}"
    )
