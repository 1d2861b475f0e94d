"""The conntrack parser's C loop (agent/_ctparse.c) and the pure-Python one agree.

Hypothesis builds dump buffers of many entry shapes (IPv4 and IPv6; TCP, UDP and ICMP;
with and without counters, marks, zones, labels, helpers, stop times), some with
flipped octets or cut short, and both parsers read them: the same entries (field for
field), the same totals, the same malformed count, or the same ConntrackError. With
``FLOWSCOPE_CONNTRACK_PURE=1`` the agent parses in Python alone; the last test runs the
parser tests that way in a child process, so CI covers both.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flowscope.agent import ctfast
from flowscope.agent.conntrack import EntryParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_agent_conntrack_parser import DONE, ct_message

pytestmark = pytest.mark.skipif(
    not ctfast.available() and not os.environ.get("CI"), reason="the C conntrack parser is not built here"
)


@st.composite
def messages(draw: Any) -> bytes:
    v6 = draw(st.booleans())
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    host = st.integers(1, 250)
    src = f"fd00::{draw(host):x}" if v6 else f"10.0.{draw(st.integers(0, 3))}.{draw(host)}"
    dst = f"fd00::{draw(host):x}" if v6 else f"10.1.0.{draw(host)}"
    proto = draw(st.sampled_from([6, 17, 1]))
    icmp = (draw(st.integers(0, 65535)), 8, 0) if proto == 1 else None
    return ct_message(
        fam, src, dst, proto, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
        counters=draw(st.none() | st.tuples(*[st.integers(0, 2**64 - 1)] * 4)),
        tcp_state=draw(st.integers(0, 9)), status=draw(st.integers(0, 2**32 - 1)),
        mark=draw(st.none() | st.integers(0, 2**32 - 1)), zone=draw(st.none() | st.integers(0, 5)),
        start=draw(st.none() | st.integers(1, 2**63)), stop=draw(st.none() | st.integers(1, 2**63)),
        labels=draw(st.none() | st.binary(min_size=16, max_size=16)), ct_id=draw(st.integers(0, 2**32 - 1)),
        icmp=icmp, helper=draw(st.none() | st.sampled_from(["ftp", "sip"])),
    )  # fmt: skip


def _run(parser: EntryParser, buf: bytes) -> tuple[Any, list[Any], int, int]:
    out: list[Any] = []
    try:
        result: Any = parser.parse(buf, len(buf), out)
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        result = (type(exc).__name__, str(exc), getattr(exc, "errno", None))
    return result, out, parser.malformed, parser.layouts_compiled


def _pair(zones: tuple[int, ...]) -> tuple[EntryParser, EntryParser]:
    fast = EntryParser(zones)
    pure = EntryParser(zones)
    pure._native = None
    return fast, pure


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(messages(), min_size=1, max_size=12),
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
    st.one_of(st.none(), st.integers(0, 4000)),
    st.sampled_from([(), (0,), (3, 5)]),
    st.booleans(),
)
def test_both_parsers_read_a_dump_alike(
    msgs: list[bytes], flips: list[tuple[int, int]], cut: int | None, zones: tuple[int, ...], again: bool
) -> None:
    buf = bytearray(b"".join(msgs) + DONE)
    for pos, value in flips:
        if pos < len(buf):
            buf[pos] = value
    data = bytes(buf[:cut] if cut is not None else buf)
    fast, pure = _pair(zones)
    assert fast._native is not None
    if again:  # layouts already compiled from clean copies of the same shapes
        clean = b"".join(msgs) + DONE
        assert _run(fast, clean) == _run(pure, clean)
    got, want = _run(fast, data), _run(pure, data)
    assert got == want
    for a, b in zip(got[1], want[1]):
        assert type(a) is type(b) and type(a.key) is type(b.key)


def test_a_mixed_dump_of_thousands_reads_alike() -> None:
    import random

    rng = random.Random(7)
    msgs = []
    for i in range(3000):
        v6 = rng.random() < 0.3
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        msgs.append(
            ct_message(
                fam, f"fd00::{i % 900 + 1:x}" if v6 else f"10.0.{i % 200}.{i % 250 + 1}", "fd00::2" if v6 else "10.9.0.2",
                rng.choice([6, 17]), rng.randrange(65536), 80, counters=tuple(rng.randrange(2**40) for _ in range(4)),
                mark=rng.choice([None, 0x1234]), zone=rng.choice([None, 3]), ct_id=i,
            )
        )  # fmt: skip
    buf = b"".join(msgs) + DONE
    fast, pure = _pair(())
    assert _run(fast, buf) == _run(pure, buf)
    assert fast._native is not None and fast.layouts_compiled >= 4


@pytest.mark.slow
def test_the_parser_tests_pass_with_the_pure_python_parser_forced() -> None:
    env = {**os.environ, ctfast.PURE_ENV: "1"}
    here = Path(__file__).parent
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("pytest")), "-q", "-p", "no:cacheprovider", str(here / "test_agent_conntrack_parser.py"),
         str(here / "test_agent_ctreuse.py")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    probe = subprocess.run(
        [sys.executable, "-c", "from flowscope.agent import ctfast; print(ctfast.available())"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip() == "False", probe.stderr
