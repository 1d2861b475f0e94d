"""The ctnetlink parser without a kernel: messages built here, byte for byte as the kernel
lays them out, in several shapes; layouts must never be applied to the wrong shape, and
malformed messages are skipped and counted, never crash the agent."""

from __future__ import annotations

import random
import socket
import struct

import pytest
from flowscope.agent.conntrack import ConntrackError, EntryParser, format_address
from hypothesis import given, settings
from hypothesis import strategies as st

NESTED = 0x8000


def nla(t, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + b"\0" * ((4 - n % 4) % 4)


def tup(fam, src, dst, proto, sport, dport, icmp=None):
    v6 = fam == socket.AF_INET6
    ip = nla(3 if v6 else 1, socket.inet_pton(fam, src)) + nla(4 if v6 else 2, socket.inet_pton(fam, dst))
    pr = nla(1, bytes([proto]))
    if icmp is None:
        pr += nla(2, struct.pack("!H", sport)) + nla(3, struct.pack("!H", dport))
    else:
        ident, typ, code = icmp
        base = 7 if v6 else 4
        pr += nla(base, struct.pack("!H", ident)) + nla(base + 1, bytes([typ])) + nla(base + 2, bytes([code]))
    return nla(1 | NESTED, ip) + nla(2 | NESTED, pr)


def ct_message(fam=socket.AF_INET, src="10.0.0.1", dst="10.0.0.2", proto=6, sport=1234, dport=80, *,
               counters=(5, 500, 4, 400), tcp_state=3, status=0xE, mark=None, zone=None, start=10**18,
               stop=None, labels=None, ct_id=77, icmp=None, helper=None, reply_src=None, seq=1):
    body = struct.pack("=BBH", fam, 0, 0)
    body += nla(1 | NESTED, tup(fam, src, dst, proto, sport, dport, icmp))
    body += nla(2 | NESTED, tup(fam, reply_src or dst, src, proto, dport, sport, icmp))
    body += nla(3, struct.pack("!I", status))
    if mark is not None:
        body += nla(8, struct.pack("!I", mark))
    body += nla(7, struct.pack("!I", 100))
    if proto == 6:
        body += nla(4 | NESTED, nla(1 | NESTED, nla(1, bytes([tcp_state])) + nla(2, b"\x07") + nla(3, b"\x07")))
    if helper:
        body += nla(5 | NESTED, nla(1, helper.encode() + b"\0"))
    if counters is not None:
        p, b, rp, rb = counters
        body += nla(9 | NESTED, nla(1, struct.pack("!Q", p)) + nla(2, struct.pack("!Q", b)))
        body += nla(10 | NESTED, nla(1, struct.pack("!Q", rp)) + nla(2, struct.pack("!Q", rb)))
    if zone is not None:
        body += nla(18, struct.pack("!H", zone))
    if start is not None:
        body += nla(20 | NESTED, nla(1, struct.pack("!Q", start)) + (nla(2, struct.pack("!Q", stop)) if stop else b""))
    body += nla(12, struct.pack("!I", ct_id))
    body += nla(11, struct.pack("!I", 1))
    if labels is not None:
        body += nla(22, labels)
    return struct.pack("=IHHII", 16 + len(body), 0x100, 2, seq, 0) + body


DONE = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0\0\0\0"


def parse(*messages, zones=()):
    p = EntryParser(zones)
    buf = b"".join(messages)
    out = []
    done, total, _ = p.parse(buf, len(buf), out)
    return p, out, done, total


def test_fields_of_each_shape():
    msgs = [
        ct_message(),
        ct_message(socket.AF_INET6, "fd00::1", "fd00::2", 17, 5353, 53, counters=(1, 80, 1, 120)),
        ct_message(proto=1, icmp=(99, 8, 0), counters=(3, 252, 3, 252)),
        ct_message(socket.AF_INET6, "fd00::1", "fd00::2", 58, 0, 0, icmp=(7, 128, 0)),
        ct_message(mark=0x1234, zone=9, labels=b"\x01" + b"\0" * 15, helper="ftp", stop=10**18 + 5),
        ct_message(dst="10.96.0.10", reply_src="10.244.0.5", dport=443),
        ct_message(counters=None, start=None),
    ]
    p, out, done, total = parse(*msgs, DONE)
    assert done and total == 7 and len(out) == 7
    tcp, udp6, icmp, icmp6, marked, dnat, bare = out
    assert (format_address(tcp.orig_src), tcp.orig_sport, tcp.orig_dport, tcp.tcp_state_name) == ("10.0.0.1", 1234, 80, "ESTABLISHED")
    assert (tcp.orig_packets, tcp.orig_bytes, tcp.reply_packets, tcp.reply_bytes) == (5, 500, 4, 400)
    assert (tcp.status, tcp.ct_id, tcp.start_ns, tcp.zone, tcp.replied) == (0xE, 77, 10**18, 0, True)
    assert (format_address(udp6.orig_dst), udp6.protocol, udp6.tcp_state, udp6.reply_bytes) == ("fd00::2", 17, -1, 120)
    assert (icmp.icmp_id, icmp.icmp_type, icmp.icmp_code, icmp.orig_sport, icmp.key.icmp_id) == (99, 8, 0, 0, 99)
    assert (icmp6.protocol, icmp6.icmp_type, icmp6.icmp_id) == (58, 128, 7)
    assert (marked.mark, marked.zone, marked.labels[0], marked.stop_ns) == (0x1234, 9, 1, 10**18 + 5)
    assert (format_address(dnat.orig_dst), format_address(dnat.reply_src)) == ("10.96.0.10", "10.244.0.5")
    assert (bare.orig_packets, bare.start_ns) == (0, 0)
    assert p.layouts_compiled == 6  # the DNAT entry has the plain TCP entry's shape


def test_layouts_are_reused_and_never_misapplied():
    # same length, different shapes: an IPv4 entry with a mark vs one with a zone+pad
    a = ct_message(mark=5)
    b = ct_message(zone=5)
    assert len(a) == len(b)
    p, out, _, _ = parse(*[a, b] * 50)
    assert [(e.mark, e.zone) for e in out] == [(5, 0), (0, 5)] * 50
    assert p.layouts_compiled == 2
    # another connection of the same shape reuses the layout with its own values
    p2 = EntryParser()
    for i in range(1, 200):
        m = ct_message(src=f"10.1.{i // 250}.{i % 250}", sport=i, counters=(i, i * 100, i, i * 10), ct_id=i)
        out = []
        p2.parse(m, len(m), out)
        e = out[0]
        assert (e.orig_sport, e.orig_bytes, e.ct_id) == (i, i * 100, i)
    assert p2.layouts_compiled == 1


def test_zone_filter_and_totals():
    p, out, _, total = parse(ct_message(zone=3), ct_message(sport=2), ct_message(sport=3, zone=4), zones=(3, 0))
    assert total == 3 and sorted(e.zone for e in out) == [0, 3]


def test_kernel_error_is_raised_with_its_errno():
    err = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -1) + b"\0" * 16
    with pytest.raises(ConntrackError) as exc:
        parse(err)
    assert exc.value.errno == 1


def test_a_message_overrunning_the_datagram_is_refused():
    m = ct_message()
    with pytest.raises(ConntrackError, match="overruns"):
        parse(m[:-8])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(20, 400), st.binary(min_size=1, max_size=4))
def test_corrupt_attributes_are_skipped_and_counted_never_crash(seed, pos, junk):
    rnd = random.Random(seed)
    good = ct_message(sport=rnd.randrange(65536))
    m = bytearray(good)
    pos = min(pos, len(m) - len(junk))
    m[pos:pos + len(junk)] = junk
    struct.pack_into("=I", m, 0, len(m))  # keep the netlink framing intact
    p = EntryParser()
    out = []
    done, total, _ = p.parse(bytes(m) + good, len(m) + len(good), out)
    assert total == 2
    assert len(out) + p.malformed == 2
    # whatever the corrupt message did, the good one after it parses exactly
    assert out[-1] == parse(good)[1][0]


def test_enable_accounting_switches_on_and_reports_what_it_could_not(tmp_path, caplog):
    from flowscope.agent.conntrack import enable_accounting

    (tmp_path / "nf_conntrack_acct").write_text("0\n")
    (tmp_path / "nf_conntrack_timestamp").mkdir()  # cannot be written: stands for a read-only /proc/sys
    got = enable_accounting(str(tmp_path))
    assert got == {"nf_conntrack_acct": True, "nf_conntrack_timestamp": False}
    assert (tmp_path / "nf_conntrack_acct").read_text().strip() == "1"
    assert "cannot set nf_conntrack_timestamp=1" in caplog.text and "flow start/stop times" in caplog.text
