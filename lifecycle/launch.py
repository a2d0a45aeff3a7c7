"""Start the other ranks for `accelerate launch --cpu --num_processes N` when no MPI does.

Accelerate's launcher for `--cpu` runs a single process and expects MPI
(`--mpirun_hostfile`) to start the rest. Without MPI, `accelerate launch --cpu
--num_processes 2 -m lifecycle pretrain ...` would quietly train on one
process. We detect that case (Accelerate set ACCELERATE_USE_CPU and
MASTER_ADDR, but no rank variables exist) and start the N ranks ourselves with
the same environment torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE), on one
machine. Each rank then joins a gloo process group through Accelerate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def requested_processes(argv: list[str]) -> int:
    """`--num_processes N` (or `=N`) from an `accelerate launch` command line, else from its
    `--config_file`; 1 if neither says."""
    for i, a in enumerate(argv):
        if a in ("--config_file", "--config-file") and i + 1 < len(argv) and "--num_processes" not in argv:
            try:
                import yaml

                with open(argv[i + 1], encoding="utf-8") as f:
                    return int((yaml.safe_load(f) or {}).get("num_processes", 1))
            except (OSError, ValueError, TypeError, AttributeError):
                return 1
        if a in ("--num_processes", "--num-processes") and i + 1 < len(argv):
            return int(argv[i + 1]) if argv[i + 1].isdigit() else 1
        for flag in ("--num_processes=", "--num-processes="):
            if a.startswith(flag) and a[len(flag):].isdigit():
                return int(a[len(flag):])
    return 1


def _launcher_argv() -> list[str]:
    try:
        import psutil

        return psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil, no permission: behave like Accelerate
        return []


def maybe_spawn_cpu_ranks() -> None:
    """If we are the lone process of a multi-process `accelerate launch --cpu`, run N ranks and exit."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() != "true" or "MASTER_ADDR" not in env:
        return
    if any(v in env for v in RANK_VARS):
        return
    argv = _launcher_argv()
    # `accelerate launch`, `accelerate-launch` or `python -m accelerate.commands.launch`.
    if not any("launch" in os.path.basename(a) for a in argv[:4]):
        return
    n = requested_processes(argv)
    if n <= 1:
        return
    procs = []
    for rank in range(n):
        child = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                     GROUP_RANK="0", ROLE_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", "lifecycle", *sys.argv[1:]], env=child))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [p.wait() for p in procs]
    bad = [c for c in codes if c != 0]
    sys.exit(bad[0] if bad else 0)
