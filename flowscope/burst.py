"""A burst of short connections, counted by the sender: ``python -m flowscope.burst``.

Why: the agent's conntrack events are measured against thousands of connections a
second that each live a few packets (benchmarks/agent_events.py, tests of the agent in
the lab). No tool on the machine makes those with a known count per connection, so this
one does, in plain Python with ``epoll`` (no asyncio: a connection costs a handful of
system calls and little else, which is what reaching 10,000 a second takes).

``serve`` answers on ``--ports`` consecutive ports from ``--port``: a TCP connection
gets ``--reply`` octets once its ``--request`` octets arrived, then the server closes
(it sends the first FIN, so the client keeps no TIME_WAIT socket and its ports are free
again at once); a UDP datagram gets one datagram of ``--reply`` octets back.

``send`` opens ``--rate`` connections a second for ``--duration`` seconds, a share
``--udp`` of them UDP (``--datagrams`` datagrams of ``--request`` octets each, every one
answered), the rest TCP (``--request`` octets, then read the answer to its end). Each
connection uses its own 5-tuple: source port and destination port step through
``64000 x --ports`` combinations, so no tuple is reused within a run of that many
connections and every connection is one conntrack entry. ``--workers`` processes share
the work. The sender writes one CSV line per connection (``--out``): protocol, source
port, destination port, octets and datagrams sent and received, and whether it was
answered; and prints a JSON summary with the rate actually reached.
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "tuple_of"]

FIRST_SPORT = 1024
SPORTS = 64000
ANSWER_TIMEOUT = 10.0


def tuple_of(i: int, ports: int, base: int) -> tuple[int, int]:
    """Source and destination port of connection ``i``."""
    return FIRST_SPORT + (i // ports) % SPORTS, base + i % ports


# --- the server -----------------------------------------------------------------------

def serve(bind: str, base: int, ports: int, request: int, reply: int, workers: int) -> int:
    for _ in range(workers - 1):
        if os.fork() == 0:
            break  # children serve too: SO_REUSEPORT spreads connections over the workers
    ep = select.epoll()
    listeners: dict[int, socket.socket] = {}
    udps: dict[int, socket.socket] = {}
    for port in range(base, base + ports):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        t.bind((bind, port))
        t.listen(4096)
        t.setblocking(False)
        listeners[t.fileno()] = t
        ep.register(t.fileno(), select.EPOLLIN)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        u.bind((bind, port))
        u.setblocking(False)
        udps[u.fileno()] = u
        ep.register(u.fileno(), select.EPOLLIN)
    answer = b"r" * reply
    conns: dict[int, list[Any]] = {}  # fd -> [socket, octets still to read]
    print("ready", flush=True)
    while True:
        for fd, _ in ep.poll():
            if fd in listeners:
                lst = listeners[fd]
                while True:
                    try:
                        c, _ = lst.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = [c, request]
                    ep.register(c.fileno(), select.EPOLLIN)
            elif fd in udps:
                u = udps[fd]
                while True:
                    try:
                        _, addr = u.recvfrom(65535)
                    except BlockingIOError:
                        break
                    try:
                        u.sendto(answer, addr)
                    except OSError:
                        pass
            else:
                st = conns.get(fd)
                if st is None:
                    continue
                c = st[0]
                try:
                    data = c.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                st[1] -= len(data)
                if data and st[1] > 0:
                    continue
                if data:
                    try:
                        c.send(answer)
                    except OSError:
                        pass
                ep.unregister(fd)
                del conns[fd]
                c.close()


# --- the sender -----------------------------------------------------------------------

def send(
    target: str, base: int, ports: int, rate: float, duration: float, udp_share: float,
    request: int, reply: int, datagrams: int, out: str, workers: int, max_inflight: int,
) -> int:
    index = 0
    for k in range(1, workers):
        if os.fork() == 0:
            index = k
            break
    rows, summary = _send_worker(
        target, base, ports, rate / workers, duration, udp_share, request, reply, datagrams,
        index, workers, max_inflight,
    )
    part = f"{out}.{index}"
    with open(part, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with open(part + ".json", "w") as fh:
        json.dump(summary, fh)
    if index:
        os._exit(0)
    for _ in range(workers - 1):
        os.wait()
    total: dict[str, float] = {}
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["proto", "sport", "dport", "sent_octets", "sent_datagrams", "recv_octets", "recv_datagrams", "answered"])
        for k in range(workers):
            with open(f"{out}.{k}", newline="") as part_fh:
                w.writerows(csv.reader(part_fh))
            os.unlink(f"{out}.{k}")
            with open(f"{out}.{k}.json") as js:
                s = json.load(js)
            os.unlink(f"{out}.{k}.json")
            for key, value in s.items():
                total[key] = max(total.get(key, 0), value) if key in ("elapsed", "opening") else total.get(key, 0) + value
    total["rate_reached"] = total["started"] / total["opening"] if total.get("opening") else 0.0
    total["rate_asked"] = rate
    print(json.dumps(total), flush=True)
    return 0


def _send_worker(
    target: str, base: int, ports: int, rate: float, duration: float, udp_share: float,
    request: int, reply: int, datagrams: int, index: int, workers: int, max_inflight: int,
) -> tuple[list[tuple[Any, ...]], dict[str, float]]:
    ep = select.epoll()
    payload = b"q" * request
    udp_every = round(udp_share * 100)
    # fd -> [socket, proto, sport, dport, sent octets, sent datagrams, recv octets, recv datagrams, deadline]
    live: dict[int, list[Any]] = {}
    rows: list[tuple[Any, ...]] = []
    started = failed = 0
    n = index  # this worker's connections are index, index + workers, ...
    t0 = time.monotonic()
    opened_until = t0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    def finish(fd: int, answered: bool) -> None:
        nonlocal failed
        st = live.pop(fd)
        try:
            ep.unregister(fd)
        except (OSError, ValueError):
            pass
        st[0].close()
        if not answered:
            failed += 1
        rows.append((st[1], st[2], st[3], st[4], st[5], st[6], st[7], int(answered)))

    while True:
        now = time.monotonic()
        elapsed = now - t0
        opening = elapsed < duration
        if opening:
            due = int(elapsed * rate) + 1
            while started < due and len(live) < max_inflight:
                sport, dport = tuple_of(n, ports, base)
                udp = n % 100 < udp_every
                try:
                    if udp:
                        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        s.setblocking(False)
                        # one source port, several destination ports: connected sockets
                        # sharing the port each receive their own peer's answers
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind(("0.0.0.0", sport))
                        s.connect((target, dport))
                        for _ in range(datagrams):
                            s.send(payload)
                        live[s.fileno()] = [s, "udp", sport, dport, request * datagrams, datagrams, 0, 0, now + ANSWER_TIMEOUT]
                        ep.register(s.fileno(), select.EPOLLIN)
                    else:
                        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        s.setblocking(False)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind(("0.0.0.0", sport))
                        err = s.connect_ex((target, dport))
                        if err not in (0, errno.EINPROGRESS):
                            raise OSError(err, os.strerror(err))
                        live[s.fileno()] = [s, "tcp", sport, dport, 0, 0, 0, 0, now + ANSWER_TIMEOUT]
                        ep.register(s.fileno(), select.EPOLLOUT)
                except OSError:
                    s.close()
                    failed += 1
                    rows.append(("udp" if udp else "tcp", sport, dport, 0, 0, 0, 0, 0))
                started += 1
                n += workers
            opened_until = now
        elif not live:
            break
        for fd, mask in ep.poll(0.002):
            st = live.get(fd)
            if st is None:
                continue
            s = st[0]
            if st[1] == "udp":
                while True:
                    try:
                        data = s.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        finish(fd, False)
                        break
                    st[6] += len(data)
                    st[7] += 1
                    if st[7] >= datagrams:
                        finish(fd, True)
                        break
            elif mask & select.EPOLLOUT:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(fd, False)
                    continue
                try:
                    s.send(payload)
                    st[4] = request
                except OSError:
                    finish(fd, False)
                    continue
                ep.modify(fd, select.EPOLLIN)
            else:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    finish(fd, st[6] > 0)
                    continue
                if data:
                    st[6] += len(data)
                else:
                    finish(fd, st[6] == reply)
        if live and int(now * 10) != int((now - 0.002) * 10):  # a few times a second
            for fd in [fd for fd, st in live.items() if st[8] < now]:
                finish(fd, False)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    summary = {
        "started": started,
        "answered": started - failed,
        "failed": failed,
        "opening": opened_until - t0,
        "elapsed": time.monotonic() - t0,
        "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }
    return rows, summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowscope.burst", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "send"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, default=20000, help="first port")
        p.add_argument("--ports", type=int, default=8, help="consecutive ports served / used")
        p.add_argument("--request", type=int, default=100, help="octets a client sends (per datagram for UDP)")
        p.add_argument("--reply", type=int, default=200, help="octets the server answers (per datagram for UDP)")
        p.add_argument("--workers", type=int, default=1)
    sub.choices["serve"].add_argument("--bind", default="0.0.0.0")
    s = sub.choices["send"]
    s.add_argument("target", help="the server's IPv4 address")
    s.add_argument("--rate", type=float, default=1000.0, help="connections a second")
    s.add_argument("--duration", type=float, default=5.0, help="seconds to open connections for")
    s.add_argument("--udp", type=float, default=0.5, help="share of UDP connections, 0 to 1")
    s.add_argument("--datagrams", type=int, default=2, help="datagrams a UDP connection sends (each answered)")
    s.add_argument("--max-inflight", type=int, default=4000)
    s.add_argument("--out", required=True, help="CSV file of every connection")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.bind, args.port, args.ports, args.request, args.reply, args.workers)
    if not 0 <= args.udp <= 1 or args.rate <= 0 or args.ports * SPORTS < 1:
        print("--udp must be within 0..1 and --rate positive", file=sys.stderr)
        return 2
    return send(
        args.target, args.port, args.ports, args.rate, args.duration, args.udp, args.request, args.reply,
        args.datagrams, args.out, args.workers, args.max_inflight,
    )


if __name__ == "__main__":
    raise SystemExit(main())
