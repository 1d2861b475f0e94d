"""The C parser's memory of the last dump (agent/_ctparse.c) changes no result.

The C parser returns an entry unchanged since the last dump as the very same object and,
given the store's connections (``ConnectionStore.held``), marks its connection seen in
place instead of handing it over. Hypothesis drives sequences of dumps (connections
that stay, change counters, state or mark, leave, come back under a new conntrack id,
move within the dump, arrive out of order, messages cut or with flipped octets) through
a ConnectionStore fed by the C parser with ``held`` and through another fed by the pure
parser: the same exports, in the same order, and the same store afterwards. Without the
C parser built (or with FLOWSCOPE_CONNTRACK_PURE=1) both sides are pure and the tests
still check the store against itself.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
from flowscope.agent import ctfast
from flowscope.agent.conntrack import EntryParser
from flowscope.agent.store import GONE, ConnectionStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_agent_conntrack_parser import DONE, ct_message

T0 = 1_700_000_000.0


def _fast() -> EntryParser:
    return EntryParser()


def _pure() -> EntryParser:
    p = EntryParser()
    p._native = None
    return p


def _store() -> ConnectionStore:
    return ConnectionStore(active_timeout=10, idle_timeout=4, max_connections=6)


def _poll(parser: EntryParser, store: ConnectionStore, buf: bytes, now: float, *, held: bool) -> Any:
    """One poll as the exporter runs it; the outcome (exports or the error) for comparison."""
    store.begin(now)
    parser.begin_dump()
    out: list[Any] = []
    try:
        done, total, _ = parser.parse(buf, len(buf), out, store.held() if held else None)
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        store.feed(out)
        return ("error", type(exc).__name__, store.finish(complete=False))
    store.feed(out)
    return (done, total, store.finish(complete=done) + store.expire(now))


def _state(store: ConnectionStore) -> list[Any]:
    return sorted(
        (tuple(c.entry), c.first_seen, c.last_activity, c.last_export, c.exported, c.idle_exported, c.ended, c.queued_at)
        for c in store._conns.values()
    )


@st.composite
def connection(draw: Any, i: int) -> dict[str, Any]:
    v6 = draw(st.booleans())
    return {
        "fam": socket.AF_INET6 if v6 else socket.AF_INET,
        "src": f"fd00::{i + 1:x}" if v6 else f"10.0.0.{i + 1}",
        "dst": "fd00::ff" if v6 else "10.0.1.1",
        "proto": draw(st.sampled_from([6, 17])),
        "sport": 1000 + i,
        "ct_id": 100 + i,
        "counters": draw(st.none() | st.just((1, 100, 1, 100))),
    }


@st.composite
def dumps(draw: Any) -> list[bytes]:
    conns = [draw(connection(i)) for i in range(draw(st.integers(1, 8)))]
    out = []
    for _ in range(draw(st.integers(2, 5))):
        msgs = []
        for c in conns:
            if draw(st.integers(0, 9)) == 0:
                continue  # not in this dump (left, or the zone of some other poll)
            what = draw(st.sampled_from(["same", "same", "same", "more", "state", "mark", "reid"]))
            if what == "more" and c["counters"] is not None:
                p, b, rp, rb = c["counters"]
                c["counters"] = (p + 1, b + 60, rp, rb)
            elif what == "state":
                c["tcp_state"] = draw(st.integers(0, 9))
            elif what == "mark":
                c["mark"] = draw(st.none() | st.integers(0, 3))
            elif what == "reid":
                c["ct_id"] += 1000  # the tuple reused by a new connection
            args = {k: v for k, v in c.items() if k in ("counters", "tcp_state", "mark", "ct_id")}
            msgs.append(ct_message(c["fam"], c["src"], c["dst"], c["proto"], c["sport"], 80, **args))
        if draw(st.booleans()):  # the kernel's order shifts (entries inserted ahead)
            msgs = draw(st.permutations(msgs))
        buf = bytearray(b"".join(msgs) + DONE)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(0, 255)), max_size=1)):
            buf[pos] = value
        cut = draw(st.none() | st.integers(0, len(buf)))
        out.append(bytes(buf if cut is None else buf[:cut]))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dumps())
def test_polls_through_the_c_parser_with_held_equal_the_pure_parser(polls: list[bytes]) -> None:
    fast, pure = _fast(), _pure()
    a, b = _store(), _store()
    for k, buf in enumerate(polls):
        now = T0 + 3 * k
        got, want = _poll(fast, a, buf, now, held=True), _poll(pure, b, buf, now, held=False)
        assert got == want
        assert _state(a) == _state(b)


def test_an_unchanged_entry_comes_back_as_the_same_object_and_is_marked_in_place() -> None:
    parser = _fast()
    if parser._native is None:
        pytest.skip("the C parser is not in use here")
    buf = b"".join(ct_message(sport=1000 + i, ct_id=10 + i) for i in range(50)) + DONE
    store = _store()
    store.max_connections = 100
    assert len(_poll(parser, store, buf, T0, held=True)[2]) == 0
    before = {k: c.entry for k, c in store._conns.items()}
    out: list[Any] = []
    parser.begin_dump()
    parser.parse(buf, len(buf), out)
    assert len(out) == 50 and all(e is before[e.key] for e in out)  # no held: handed over, same objects
    store.begin(T0 + 1)
    parser.begin_dump()
    out = []
    parser.parse(buf, len(buf), out, store.held())
    assert out == [] and parser.last_marked == 50
    assert all(c.seen == store._poll for c in store._conns.values())
    assert store.finish() == []
    # one connection's counters move: only it is handed over, a new entry with the old key object
    changed = b"".join(ct_message(sport=1000 + i, ct_id=10 + i, counters=(9, 900, 4, 400) if i == 7 else (5, 500, 4, 400))
                       for i in range(50)) + DONE
    store.begin(T0 + 2)
    parser.begin_dump()
    out = []
    parser.parse(changed, len(changed), out, store.held())
    assert len(out) == 1 and out[0].orig_packets == 9 and parser.last_marked == 49
    old = store.get(out[0].key)
    assert old is not None and out[0] is not old.entry and out[0].key is old.entry.key


def test_a_connection_the_store_let_go_is_not_marked_and_another_store_is_not_confused() -> None:
    parser = _fast()
    if parser._native is None:
        pytest.skip("the C parser is not in use here")
    buf = ct_message(ct_id=5) + DONE
    store = _store()
    _poll(parser, store, buf, T0, held=True)
    _poll(parser, store, buf, T0 + 0.5, held=True)  # now the parser knows the connection too
    assert parser.last_marked == 1
    (conn,) = store._conns.values()
    # the store lets it go (a DESTROY), yet the same entry is listed again: it must come back
    store.apply_events([(0x102, conn.entry)], T0 + 1)
    assert conn.seen == GONE and len(store) == 0
    _poll(parser, store, buf, T0 + 2, held=True)
    assert len(store) == 1 and next(iter(store._conns.values())) is not conn
    # a fresh store on the same parser (a restarted exporter): every entry is fed to it
    other = _store()
    _poll(parser, other, buf, T0 + 3, held=True)
    assert len(other) == 1 and parser.last_marked == 0


def test_a_broken_dump_leaves_the_parser_consistent() -> None:
    fast, pure = _fast(), _pure()
    a, b = _store(), _store()
    whole = b"".join(ct_message(sport=1000 + i, ct_id=10 + i) for i in range(5)) + DONE
    half = b"".join(ct_message(sport=1000 + i, ct_id=10 + i, counters=(6, 600, 4, 400)) for i in range(3))
    for k, buf in enumerate([whole, half, whole, whole]):
        assert _poll(fast, a, buf, T0 + 5 * k, held=True) == _poll(pure, b, buf, T0 + 5 * k, held=False)
        assert _state(a) == _state(b)


@pytest.mark.skipif(
    not ctfast.available() and (not os.environ.get("CI") or bool(os.environ.get(ctfast.PURE_ENV))),
    reason="the C conntrack parser is not built here (or FLOWSCOPE_CONNTRACK_PURE=1)",
)
def test_the_parser_keeps_no_more_than_two_dumps() -> None:
    parser = _fast()
    assert parser._native is not None
    for k in range(3):
        buf = b"".join(ct_message(sport=1000 + i, ct_id=100 * k + i + 1) for i in range(20)) + DONE
        parser.begin_dump()
        parser.parse(buf, len(buf), [])
    assert parser._native._c.remembered == 20  # the last dump's; the ones before released
