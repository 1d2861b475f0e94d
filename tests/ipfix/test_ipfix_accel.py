"""The C accelerator and the pure-Python codec give the same answers, bytes for bytes.

ipfix/_speedups.c is a twin of the generated codec in ipfix/template.py. Hypothesis builds
templates of every kind of field (each integer width and reduced size, floats, booleans,
MAC and IP addresses, the four timestamp types, strings and octet arrays of fixed and
variable length, lengths that do not fit their type) and compares the two:

- decoding valid records, records with flipped octets, truncated sets and plain random
  bytes: where the accelerator answers, it answers what the twin answers, value and type;
  where it declines, the public function gives the twin's answer (the same records, or
  the same MalformedMessage);
- encoding records of right and wrong values, with message sizes that force cuts and
  RecordTooLarge: the same messages and sequence numbers, or the same error and message.

With ``FLOWSCOPE_IPFIX_PURE=1`` the library uses the twin alone; the last test runs the
codec tests in a child process that way, so CI covers both codecs.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowscope.ipfix import ExportSession, FieldSpecifier, InformationElement, Template, accel, default_registry
from flowscope.ipfix.registry import VARIABLE_LENGTH, DataType

# The built-in registry has no signed, float32, boolean or list elements: add some, privately.
REG = default_registry().copy()
for _i, _dt in enumerate([DataType.signed8, DataType.signed16, DataType.signed32, DataType.signed64,
                          DataType.float32, DataType.boolean, DataType.basicList]):  # fmt: skip
    REG.add(InformationElement(f"test{_dt.name.capitalize()}", 99999, 1 + _i, _dt))
# Skipped where the accelerator is turned off on purpose, or (outside CI, which must build
# it) not built.
pytestmark = pytest.mark.skipif(
    not accel.available() and (os.environ.get(accel.PURE_ENV, "") not in ("", "0") or not os.environ.get("CI")),
    reason="the C accelerator is turned off (FLOWSCOPE_IPFIX_PURE) or not built here",
)

# (element, declared length): every kind of field the codec knows, including lengths that
# make it fall back to raw octets.
FIELDS: list[tuple[str, int]] = [
    ("protocolIdentifier", 1), ("sourceTransportPort", 2), ("sourceTransportPort", 1),
    ("ingressInterface", 4), ("ingressInterface", 3), ("octetDeltaCount", 8), ("octetDeltaCount", 5),
    ("octetDeltaCount", 1), ("testSigned8", 1), ("testSigned16", 2), ("testSigned16", 1),
    ("testSigned32", 4), ("testSigned32", 3), ("testSigned64", 8), ("testSigned64", 6),
    ("testFloat32", 4), ("samplingProbability", 8), ("samplingProbability", 4), ("testBoolean", 1),
    ("sourceMacAddress", 6), ("flowStartSeconds", 4), ("flowStartMilliseconds", 8),
    ("flowStartMicroseconds", 8), ("flowStartNanoseconds", 8), ("sourceIPv4Address", 4),
    ("sourceIPv6Address", 16), ("interfaceName", VARIABLE_LENGTH), ("interfaceName", 12),
    ("applicationId", VARIABLE_LENGTH), ("applicationId", 5), ("sourceIPv4Address", 3),
    ("octetDeltaCount", VARIABLE_LENGTH), ("testBasiclist", VARIABLE_LENGTH), ("testBasiclist", 7),
    ("sourcePodName", VARIABLE_LENGTH), ("flowType", 1), ("tcpState", VARIABLE_LENGTH),
]  # fmt: skip


def _pair(spec: list[tuple[str, int]]) -> tuple[Template, Template]:
    """The same template twice: accelerated, and with the pure-Python codec only."""
    fields = [FieldSpecifier(REG.get(name), length) for name, length in spec]
    fast = Template(256, fields)
    pure = Template(256, fields)
    pure._native = None
    return fast, pure


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (1, 1.0 and True are not the same value here), NaN included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("!d", a) == struct.pack("!d", b) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def _same_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        list(x) == list(y) and all(_same(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        return type(exc).__name__, str(exc)


def mangled(data: st.DataObject, body: bytes) -> tuple[bytes, int, str]:
    """A set body at offset 4 of a buffer (two stray octets after it) as it was, or with
    octets flipped, cut short, padded, or random octets instead; its end, and which."""
    mode = data.draw(st.sampled_from(["valid", "flipped", "cut", "random", "padded"]))
    buf = bytearray(b"\x00" * 4 + body + b"\x07\x07")
    end = 4 + len(body)
    if mode == "flipped" and body:
        for _ in range(data.draw(st.integers(1, 4))):
            buf[data.draw(st.integers(4, end - 1))] = data.draw(st.integers(0, 255))
    elif mode == "cut":
        end = data.draw(st.integers(4, end))
    elif mode == "random":
        buf = bytearray(b"\x00" * 4 + data.draw(st.binary(max_size=200)))
        end = len(buf)
    elif mode == "padded":
        pad = data.draw(st.integers(1, 3))
        buf[end:end] = b"\x00" * pad
        end += pad
    return bytes(buf), end, mode


def _value(data: st.DataObject, name: str, length: int, wrong: bool) -> Any:
    """A value for one field: valid for its type, or (wrong) anything at all."""
    if wrong:
        edges = [-(2**63) - 1, -(2**63), -(2**31) - 1, -32769, -129, -1, 127, 128, 255, 256, 32767, 32768, 65536,
                 2**24, 2**31, 2**32, 2**40, 2**63, 2**64 - 1, 2**64]  # fmt: skip
        return data.draw(
            st.one_of(
                st.sampled_from(edges), st.none(), st.integers(), st.floats(), st.text(max_size=4),
                st.binary(max_size=4), st.booleans(), st.sampled_from(["10.0.0.300", "01.2.3.4", "1.2.3", "1.2.3.4.", "1..2.3", "1.2.3.04", "256.1.1.1", " 1.2.3.4", "1.2.3.4\x00", "１.2.3.4", "0.0.0.0", "255.255.255.255", "1.2.3.4x"]), st.just([1]), st.just(1.5),
                st.just("ab:cd"), st.just(b"x" * 70000), st.just("\ud800"), st.just(float("inf")),
            )
        )
    dt = REG.get(name).data_type
    variable = length == VARIABLE_LENGTH
    if variable and dt not in (DataType.string, DataType.octetArray):
        return data.draw(st.binary(max_size=300))
    if dt.allowed_lengths and not variable and length not in dt.allowed_lengths:
        return data.draw(st.binary(min_size=length, max_size=length))
    if dt in (DataType.unsigned8, DataType.unsigned16, DataType.unsigned32, DataType.unsigned64):
        return data.draw(st.integers(min_value=0, max_value=2 ** (8 * length) - 1))
    if dt in (DataType.signed8, DataType.signed16, DataType.signed32, DataType.signed64):
        half = 2 ** (8 * length - 1)
        return data.draw(st.integers(min_value=-half, max_value=half - 1))
    if dt in (DataType.float32, DataType.float64):
        return data.draw(st.floats(width=32 if length == 4 else 64, allow_nan=False))
    if dt is DataType.boolean:
        return data.draw(st.booleans())
    if dt is DataType.macAddress:
        return data.draw(st.binary(min_size=6, max_size=6)).hex(":")
    if dt is DataType.dateTimeSeconds:
        return data.draw(st.integers(min_value=0, max_value=2**32 - 1))
    if dt in (DataType.dateTimeMilliseconds, DataType.dateTimeMicroseconds, DataType.dateTimeNanoseconds):
        return data.draw(
            st.one_of(
                st.integers(min_value=0, max_value=2_000_000_000), st.floats(min_value=0, max_value=2e9),
                st.integers(min_value=0, max_value=2 * 10**12).map(lambda ms: ms / 1000),  # what peers send
            )
        )
    if dt is DataType.ipv4Address:
        return ".".join(str(b) for b in data.draw(st.binary(min_size=4, max_size=4)))
    if dt is DataType.ipv6Address:
        return str(ipaddress.IPv6Address(data.draw(st.binary(min_size=16, max_size=16))))
    if dt is DataType.string:
        size = 300 if variable else length
        return data.draw(st.text(max_size=size).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) <= 65535))
    return data.draw(st.binary(max_size=300 if variable else length))


specs = st.lists(st.sampled_from(FIELDS), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs, st.data())
def test_decoding_agrees_with_the_pure_python_codec(spec: list[tuple[str, int]], data: st.DataObject) -> None:
    fast, pure = _pair(spec)
    assert fast._native is not None
    records = [{k: _value(data, n, ln, False) for k, (n, ln) in zip(fast.keys, spec)} for _ in range(data.draw(st.integers(0, 4)))]
    body = b"".join(pure.encode_record(r) for r in records)
    raw, end, mode = mangled(data, body)
    want = _outcome(pure.decode_records, raw, 4, end)
    native = fast._native.decode_set(raw, 4, end)
    if native is not None:  # the accelerator answered: it must be the twin's answer
        assert want[0] == "ok" and _same_records(native, want[1]), (mode, native, want)
    got = _outcome(fast.decode_records, raw, 4, end)
    assert got[0] == want[0]
    assert _same_records(got[1], want[1]) if got[0] == "ok" else got == want
    if mode == "valid":
        assert native is not None or any(isinstance(v, str) and not v.isascii() for r in records for v in r.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs, st.data())
def test_encoding_agrees_with_the_pure_python_codec(spec: list[tuple[str, int]], data: st.DataObject) -> None:
    fast, pure = _pair(spec)
    records: list[Any] = [
        {k: _value(data, n, ln, False) for k, (n, ln) in zip(fast.keys, spec)} for _ in range(data.draw(st.integers(0, 6)))
    ]
    if records and data.draw(st.booleans()):  # one value of the wrong type or out of range
        i = data.draw(st.integers(0, len(records) - 1))
        field = data.draw(st.integers(0, len(spec) - 1))
        records[i][fast.keys[field]] = _value(data, *spec[field], True)
    if records and data.draw(st.booleans()):  # keys missing, in another order, or extra
        i = data.draw(st.integers(0, len(records) - 1))
        items = list(records[i].items())
        data.draw(st.randoms()).shuffle(items)
        records[i] = dict(items[: data.draw(st.integers(0, len(items)))], extra=1)
    size = data.draw(st.sampled_from([None, 40, 90, 400, 1500]))
    sequence = data.draw(st.sampled_from([0, 2**32 - 3]))
    outcomes = []
    for template in (fast, pure):
        session = ExportSession(7)
        session.add_template(template)
        session.sequence_number = sequence
        outcomes.append((_outcome(lambda: session.encode_records(256, records, 5, max_message_size=size)), session.sequence_number))
    assert outcomes[0] == outcomes[1]
    if outcomes[0][0][0] == "ok":  # what was sent is what the twin decodes, record for record
        back = [r for m in outcomes[0][0][1] for r in pure.decode_records(m, 20, len(m))]
        assert len(back) == len(records)


def test_an_agent_message_decodes_the_same_both_ways() -> None:
    from flowscope.ipfix.antrea import AGENT_IPV4_FIELDS

    fast, pure = _pair([(n, REG.get(n).data_type.default_length) for n in AGENT_IPV4_FIELDS])
    rec = {}
    for i, key in enumerate(fast.keys):
        dt = REG.get(key).data_type
        rec[key] = {
            DataType.string: f"name-{i}", DataType.ipv4Address: f"10.0.0.{i}", DataType.ipv6Address: "fd00::1",
        }.get(dt, i)
    session = ExportSession(1)
    session.add_template(fast)
    (msg,) = session.encode_records(256, [rec, dict(rec, sourcePodName="ünïcode"), dict(rec, destinationPodName=b"\xff".decode("latin-1"))], 0)
    native = fast._native.decode_set(msg, 20, len(msg)) if fast._native else None
    assert native is not None and _same_records(native, pure.decode_records(msg, 20, len(msg)))
    assert native[1]["sourcePodName"] == "ünïcode" and native[0] == rec
    bad = msg[:20] + msg[20:].replace(b"\xc3\xbc", b"\xc3\x28", 1)  # invalid UTF-8: decoded leniently
    assert fast._native.decode_set(bad, 20, len(bad)) is None
    assert _same_records(fast.decode_records(bad, 20, len(bad)), pure.decode_records(bad, 20, len(bad)))


@pytest.mark.slow
def test_the_codec_tests_pass_with_the_pure_python_codec_forced() -> None:
    here = Path(__file__).parent
    env = {**os.environ, accel.PURE_ENV: "1"}
    probe = subprocess.run(
        [sys.executable, "-c", "from flowscope.ipfix import accel; print(accel.available())"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip() == "False", probe.stderr
    pytest_bin = Path(sys.executable).with_name("pytest")
    proc = subprocess.run(
        [str(pytest_bin), "-q", "-p", "no:cacheprovider", str(here / "test_ipfix_codec.py"), str(here / "test_ipfix_fuzz.py"),
         str(here / "test_ipfix_review.py")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def _random_value(rng: random.Random, name: str, length: int) -> Any:
    """A value over the whole range of its field (hypothesis favours small, round ones)."""
    dt = REG.get(name).data_type
    variable = length == VARIABLE_LENGTH
    if (variable and dt not in (DataType.string, DataType.octetArray)) or dt.value >= 20 or (
        dt.allowed_lengths and not variable and length not in dt.allowed_lengths
    ) or dt is DataType.octetArray:
        return rng.randbytes(rng.randrange(300) if variable else length)
    if dt.name.startswith("unsigned"):
        return rng.randrange(2 ** (8 * length))
    if dt.name.startswith("signed"):
        return rng.randrange(2 ** (8 * length)) - 2 ** (8 * length - 1)
    if dt in (DataType.float32, DataType.float64):
        return struct.unpack("!f" if length == 4 else "!d", rng.randbytes(length))[0]
    if dt is DataType.boolean:
        return rng.random() < 0.5
    if dt is DataType.macAddress:
        return rng.randbytes(6).hex(":")
    if dt is DataType.dateTimeSeconds:
        return rng.randrange(2**32)
    if dt is DataType.dateTimeMilliseconds:
        return rng.randrange(2**63) / 1000 if rng.random() < 0.5 else rng.randrange(2 * 10**12) / 1000
    if dt in (DataType.dateTimeMicroseconds, DataType.dateTimeNanoseconds):
        return rng.uniform(0, 2e9)
    if dt is DataType.ipv4Address:
        return ".".join(str(b) for b in rng.randbytes(4))
    if dt is DataType.ipv6Address:
        return str(ipaddress.IPv6Address(rng.randbytes(16)))
    text = "".join(rng.choice("abcdefghij-0123456789.é😀") for _ in range(rng.randrange(40)))
    return text if variable else text.encode()[:length].decode("utf-8", "ignore")


@pytest.mark.parametrize("field", FIELDS, ids=[f"{n}-{ln}" for n, ln in FIELDS])
def test_each_field_kind_agrees_over_its_whole_range(field: tuple[str, int]) -> None:
    rng = random.Random(f"{field}")
    fast, pure = _pair([field, ("protocolIdentifier", 1)])
    key, other = fast.keys
    records = [{key: _random_value(rng, *field), other: 6} for _ in range(3000)]
    sent = []
    for template in (fast, pure):
        session = ExportSession(1)
        session.add_template(template)
        sent.append(session.encode_records(256, records, 0))
    assert sent[0] == sent[1]
    for msg in sent[0]:
        native = fast._native.decode_set(msg, 20, len(msg)) if fast._native else None
        assert native is not None and _same_records(native, pure.decode_records(msg, 20, len(msg)))


@pytest.mark.slow
def test_without_a_compiler_the_install_works_and_says_the_twins_serve(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, text=True, check=True)  # fmt: skip
    src = tmp_path / "src"
    for name in filter(None, listed.stdout.split("\0")):
        if (repo / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((repo / name).read_bytes())
    env = {**os.environ, "CC": "/bin/false"}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("flowscope-*.whl")
    import zipfile

    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    code = (
        f"import sys, logging; sys.path.insert(0, {str(site)!r}); logging.basicConfig(level=logging.INFO)\n"
        "from flowscope.ipfix import Template, ExportSession, accel\n"
        "from flowscope.agent import ctfast, conntrack\n"
        "t = Template.build(256, ['sourceIPv4Address', 'sourcePodName']); Template.build(257, ['octetDeltaCount'])\n"
        "s = ExportSession(1); s.add_template(t)\n"
        "(m,) = s.encode_records(256, [{'sourceIPv4Address': '10.0.0.1', 'sourcePodName': 'web'}], 0)\n"
        "assert t.decode_records(m, 20, len(m)) == [{'sourceIPv4Address': '10.0.0.1', 'sourcePodName': 'web'}]\n"
        "conntrack.EntryParser(); conntrack.EntryParser()\n"
        "print(accel.available(), ctfast.available())\n"
    )
    # The base interpreter, isolated: the editable install of this checkout must not answer.
    base = Path(sys.base_prefix) / "bin" / "python3"
    proc = subprocess.run([str(base), "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    assert proc.stderr.count("IPFIX codec: pure Python") == 1, proc.stderr
    assert proc.stderr.count("conntrack parser: pure Python") == 1, proc.stderr
