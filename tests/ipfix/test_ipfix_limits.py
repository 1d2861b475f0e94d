"""The bounds a peer meets in the sans-IO decoder and the template codecs (issue 10): template
size, fields per session, the compile budget, observation domains, expiry without scans,
sequence-number sanity and bounded string interning. Pure: no sockets, the time is passed."""

from __future__ import annotations

import struct
import time

import pytest

from flowscope.ipfix import Template
from flowscope.ipfix.codec import HEADER, Decoder, ExportSession
from flowscope.ipfix.errors import Deferred, MalformedMessage
from flowscope.ipfix.registry import default_registry
from flowscope.ipfix.template import CODEC_CACHE, CompileBudget, FieldSpecifier, _Intern

REG = default_registry()


def template_message(template_id: int, n_fields: int, *, domain: int = 0, seq: int = 0, first_ie: int = 1) -> bytes:
    """A template set with one template of ``n_fields`` distinct-looking fields: a mix of
    counters and variable-length strings, numbered from ``first_ie`` so each call can make
    a layout never seen before."""
    body = bytearray(struct.pack("!HH", template_id, n_fields))
    for i in range(n_fields):
        if i % 2:
            body += struct.pack("!HHI", 0x8000 | (1 + (first_ie + i) % 30000), 65535, 56506)
        else:
            body += struct.pack("!HH", 1, 8)  # octetDeltaCount
    sets = struct.pack("!HH", 2, 4 + len(body)) + bytes(body)
    return HEADER.pack(10, HEADER.size + len(sets), 0, seq, domain) + sets


def header_only(domain: int, seq: int = 0) -> bytes:
    return HEADER.pack(10, HEADER.size, 0, seq, domain)


def test_a_template_over_the_field_limit_closes_a_stream_and_is_skipped_over_udp() -> None:
    msg = template_message(300, 2000)
    with pytest.raises(MalformedMessage, match="2000 fields, more than the limit of 1024"):
        Decoder(transport="tcp").decode(msg)
    udp = Decoder(transport="udp", template_lifetime=60)
    out = udp.decode(msg, 0.0)
    assert udp.templates_refused == 1 and udp.template_count == 0
    assert out.sets and not out.sets[0].templates  # type: ignore[union-attr]


def test_fields_held_per_session_are_bounded() -> None:
    d = Decoder(transport="udp", template_lifetime=60, max_session_fields=250)
    for tid in range(300, 310):
        d.decode(template_message(tid, 100, first_ie=tid * 7), 0.0)
    assert d.template_count == 2 and d.field_count == 200
    assert d.templates_refused == 8


def test_the_compile_budget_defers_new_layouts_on_streams_and_charges_nothing_for_cached_ones() -> None:
    budget = CompileBudget(rate=100.0, burst=100.0)
    d = Decoder(transport="tcp", compile_budget=budget)
    d.decode(template_message(300, 80, first_ie=11), 10.0)  # 100 -> 20 tokens
    d.decode(template_message(301, 80, first_ie=12), 10.0)  # 20 > 0: allowed, -> -60
    with pytest.raises(Deferred) as err:
        d.decode(template_message(302, 80, first_ie=13), 10.0)
    assert 0.6 <= err.value.retry_after <= 0.62
    assert d.template_count == 2
    d.decode(template_message(302, 80, first_ie=13), 10.0 + err.value.retry_after)  # refilled: goes
    assert d.template_count == 3
    # the same layout from another session is compiled already: free even with an empty bucket
    other = Decoder(transport="tcp", compile_budget=budget)
    other.decode(template_message(300, 80, first_ie=11), 10.7)
    assert other.template_count == 1 and budget.charged == 240


def test_the_compile_budget_skips_templates_over_udp_and_counts_them() -> None:
    budget = CompileBudget(rate=10.0, burst=10.0)
    d = Decoder(transport="udp", template_lifetime=60, compile_budget=budget)
    d.decode(template_message(300, 50, first_ie=21), 0.0)
    d.decode(template_message(301, 50, first_ie=22), 0.0)
    assert d.template_count == 1 and d.templates_refused == 1 and budget.refused == 1


def test_the_codec_cache_is_bounded_by_fields_not_entries() -> None:
    before = CODEC_CACHE.max_fields
    CODEC_CACHE.max_fields = 3000
    try:
        CODEC_CACHE.clear()
        for i in range(10):
            Decoder(transport="tcp").decode(template_message(300, 1000, first_ie=1000 + i))
        assert CODEC_CACHE.fields <= 3000 and len(CODEC_CACHE.entries) <= 3
        assert CODEC_CACHE.evictions >= 7
    finally:
        CODEC_CACHE.max_fields = before
        CODEC_CACHE.clear()


def test_observation_domains_are_bounded_least_recently_used_first() -> None:
    d = Decoder(transport="tcp", max_domains=4)
    d.decode(template_message(300, 4, domain=1), 0.0)
    for domain in range(2, 50):
        d.decode(header_only(domain))
        d.decode(header_only(1))  # domain 1 stays in use, so it is never the one forgotten
    assert len(d.domains) == 4 and 1 in d.domains and d.domains_evicted == 45
    assert d.template_count == 1
    d.decode(template_message(301, 4, domain=99), 0.0)  # a template in an evicted domain goes too
    for domain in range(100, 104):
        d.decode(header_only(domain))
    assert 99 not in d.domains and 1 not in d.domains and d.template_count == 0 and d.field_count == 0


def _per_message(domains: int) -> tuple[Decoder, float]:
    d = Decoder(transport="udp", template_lifetime=100.0, max_domains=100_000, max_templates=100_000)
    for domain in range(domains):
        d.decode(template_message(300, 2, domain=domain), float(domain) / 1000)
    start = time.perf_counter()
    for _ in range(3000):
        d.decode(header_only(7, seq=0), 10.0)
    return d, (time.perf_counter() - start) / 3000


def test_udp_expiry_costs_what_expires_not_what_is_held() -> None:
    _, few = _per_message(10)
    d, many = _per_message(20_000)
    assert d.template_count == 20_000
    # a scan over 20k domains per message would cost ~2000 times more; an expiry queue, about the same
    assert many < few * 5, f"{many * 1e6:.1f} us a message with 20k domains, {few * 1e6:.1f} us with 10"
    assert d.expire(100.0 + 5.0) == 5001 and d.template_count == 14_999


def test_sequence_numbers_count_plausible_gaps_only() -> None:
    t = Template.build(256, ["octetDeltaCount"])
    ex = ExportSession(0)
    ex.add_template(t)
    d = Decoder(transport="udp", template_lifetime=60)
    d.decode(ex.encode_templates(0)[0], 0.0)
    first = ex.encode_records(256, [{"octetDeltaCount": 1}] * 3, 0)[0]
    d.decode(first, 0.0)
    ex.sequence_number += 5  # five records lost
    d.decode(ex.encode_records(256, [{"octetDeltaCount": 1}], 0)[0], 0.0)
    assert d.lost_records == 5
    ex.sequence_number += 31_000_000_000 % 2**32  # a peer claiming billions lost
    d.decode(ex.encode_records(256, [{"octetDeltaCount": 1}], 0)[0], 0.0)
    ex.sequence_number = 0  # an exporter restart
    d.decode(ex.encode_records(256, [{"octetDeltaCount": 1}], 0)[0], 0.0)
    assert d.lost_records == 5 and d.sequence_jumps == 2


def test_string_interning_is_bounded_in_bytes_and_skips_long_values() -> None:
    cache = _Intern(bytes.decode, max_bytes=10_000, max_key=512)
    for i in range(3000):
        cache[b"x" * 60_000 + str(i).encode()]  # long: converted, never kept
    assert len(cache) == 0 and cache.size == 0
    for i in range(3000):
        cache[f"pod-{i:06d}-".encode() * 20]
    assert cache.size <= 10_000 and cache.clears > 0


def test_large_strings_from_a_peer_do_not_stay_in_the_decoders_string_cache() -> None:
    from flowscope.ipfix import template as tmod

    t = Template(400, [FieldSpecifier(REG.get("sourcePodName"), 65535)])
    ex = ExportSession(0)
    ex.add_template(t)
    d = Decoder(transport="tcp")
    d.decode(ex.encode_templates(0)[0])
    before = tmod._STR.size
    for i in range(200):
        name = "é" + "p" * 60_000 + str(i)  # non-ASCII and over 255 octets: the exact decoder
        for m in ex.encode_records(400, [{"sourcePodName": name}], 0):
            out = d.decode(m)
            assert next(out.data_records())[1]["sourcePodName"] == name
    assert tmod._STR.size - before < 1_000_000


def test_invalid_utf8_in_a_fixed_length_string_is_kept_leniently_not_raised() -> None:
    """Found by the message fuzz: the lenient decoder still decoded fixed-length strings strictly."""
    t = Template(401, [FieldSpecifier(REG.get("sourcePodName"), 12), FieldSpecifier(REG.get("octetDeltaCount"), 8)])
    body = b"ab\xa5\xffcd\0\0\0\0\0\0" + (7).to_bytes(8, "big")
    sets = struct.pack("!HH", 401, 4 + len(body)) + body
    ex = ExportSession(0)
    ex.add_template(t)
    d = Decoder(transport="udp", template_lifetime=60)
    d.decode(ex.encode_templates(0)[0], 0.0)
    out = d.decode(HEADER.pack(10, HEADER.size + len(sets), 0, 0, 0) + sets, 0.0)
    ((_, rec),) = list(out.data_records())
    assert rec["sourcePodName"] == "ab\ufffd\ufffdcd" and rec["octetDeltaCount"] == 7
