"""The lab's traffic program (``python -m flowscope.lab send``), on loopback.

Its ``--timeout`` tells a denied connection (a dropped SYN) from an answered one; the
end-to-end tests compare what it prints with the octets the server sent. On a loaded
machine a server may answer later than that timeout: the client must still wait for
the whole answer, not die half way and print nothing.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time


def _slow_server(delay: float, reply: int) -> tuple[socket.socket, list[int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    got: list[int] = []

    def serve() -> None:
        conn, _ = srv.accept()
        total = 0
        while data := conn.recv(65536):
            total += len(data)
        got.append(total)
        time.sleep(delay)  # the slow server this test is about
        conn.sendall(b"r" * reply)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, got


def test_a_slow_answer_is_waited_for_beyond_the_connect_timeout():
    srv, got = _slow_server(delay=1.0, reply=5000)
    try:
        port = srv.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "flowscope.lab", "send", f"127.0.0.1:{port}", "--bytes", "1234", "--timeout", "0.3"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    finally:
        srv.close()
    assert (out.returncode, out.stdout.strip()) == (0, "5000"), out.stderr
    assert got == [1234]


def test_nothing_listening_is_refused():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # bound, never listened: the port refuses
    out = subprocess.run(
        [sys.executable, "-m", "flowscope.lab", "send", f"127.0.0.1:{port}", "--timeout", "0.3"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 1 and out.stdout.startswith("refused:"), (out.stdout, out.stderr)
