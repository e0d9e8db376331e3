"""Launch a test script as `torchrun --nproc_per_node 2` on the CPU (gloo), the way a user's job runs."""
from __future__ import annotations

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
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as launcher:
        try:
            stdout, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
            raise
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
