"""Launch a test script as `torchrun --nproc_per_node 2` on the CPU (gloo), the way a user's job runs."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def torchrun_two_processes(script: Path, *script_args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node 2 script ARGS` and wait for it.

    The launch gets a fresh environment (no RANK etc. from any torchrun the tests run in), the
    repository and tests/ on PYTHONPATH, no CUDA and one OpenMP thread per process. On timeout
    the launcher and both workers are killed (a hung worker would otherwise outlive the test)
    and subprocess.TimeoutExpired is raised.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *script_args]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as launcher:
        try:
            stdout, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(launcher.pid), launcher.pid]:  # workers first: they hold the pipes too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            launcher.communicate()
            raise
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)


def _descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc; torchrun's workers run in sessions of their own,
    so killing the launcher's process group would leave them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
