"""The lab cleans up everything it made, also after the test that built it crashed.

A process builds a lab, starts a program inside one of its Pods and is SIGKILLed (no
``finally``, no atexit). The next lab, before building anything, finds the dead
owner's marker and removes its namespaces and the program left running in them; a lab
whose owner lives is left alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import require_root, require_tool

CRASHING = """
import os, signal, subprocess, sys
from flowscope.lab import Lab
lab = Lab()
lab.add_node("node-a")
pod = lab.add_pod("node-a", "p", "ns")
sleeper = subprocess.Popen(pod.exec_args("sleep", "300"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(lab.suffix, sleeper.pid, " ".join(lab.namespaces), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def namespaces() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_crashed_labs_namespaces_and_processes_are_removed_by_the_next_lab():
    require_root()
    require_tool("nft")
    from flowscope.lab import MARKER_DIR, Lab

    proc = subprocess.run([sys.executable, "-c", CRASHING], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    suffix, pid, names = proc.stdout.split(" ", 2)
    made = set(names.split())
    assert len(made) == 3 and made <= namespaces()
    assert alive(int(pid))
    assert os.path.exists(os.path.join(MARKER_DIR, f"{suffix}.json"))
    with Lab() as live:  # a new lab reaps the dead one first; its own marker names a live owner
        assert not made & namespaces()
        assert not os.path.exists(os.path.join(MARKER_DIR, f"{suffix}.json"))
        deadline = time.monotonic() + 10
        while alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(int(pid))
        from flowscope.lab import reap_stale

        assert reap_stale() == []  # the live lab is not touched
        assert live.fabric in namespaces()
    assert live.fabric not in namespaces()
