"""The IPFIX message codec (RFC 7011), sans-IO: bytes in, messages out, and back.

Nothing here opens a socket, reads a clock, starts a thread or counts a metric: callers
pass the export time and the current time in, and get bytes or :class:`Message` objects
out. The transports (``collecting.py``, ``exporting.py``), the agent and the aggregator wrap these objects.

Exporting side: an :class:`ExportSession` is one exporter's view of one transport
session and observation domain. It owns the templates it announced and the sequence
number, which counts the data records sent before each message (RFC 7011 section 3.1),
and it cuts records into messages no larger than the path allows.

Collecting side: a :class:`Decoder` is the collector's state for one transport session.
Templates are scoped per (transport session, observation domain) (section 8), so each
session gets its own Decoder. It honours what a peer may send: several sets per message
and several records per set, set padding (3.3.1), reduced-size integers (6.2),
variable-length fields with the 255 escape (7), options templates (3.4.2), template
withdrawals including withdraw-all with ids 2 and 3 (8.1), and enterprise elements,
unknown ones kept as raw bytes. Over UDP withdrawals are ignored (8.4) and templates
expire after a lifetime unless refreshed (8.4); a data set whose template is unknown is
skipped and counted, since over UDP that happens whenever a collector restarts. Over
TCP and TLS it is a protocol error.

A stream transport needs message boundaries: :class:`MessageFramer` cuts a byte stream
into messages using the length field of each header.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Literal

from .accel import data_records_iterator as _data_records
from .errors import Deferred, MalformedMessage, RecordTooLarge, UsageError
from .registry import Registry, default_registry
from .template import CompileBudget, FieldSpecifier, Record, Template, is_compiled

__all__ = [
    "VERSION",
    "HEADER",
    "MAX_MESSAGE_SIZE",
    "TEMPLATE_SET_ID",
    "OPTIONS_TEMPLATE_SET_ID",
    "DataSet",
    "TemplateSet",
    "Message",
    "ExportSession",
    "Decoder",
    "MessageFramer",
    "Transport",
]

VERSION = 10
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence number, domain
SET_HEADER = struct.Struct("!HH")
MAX_MESSAGE_SIZE = 65535
TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
MIN_DATA_SET_ID = 256

Transport = Literal["udp", "tcp", "tls", "sctp"]


@dataclass(slots=True)
class DataSet:
    """A data set: its template and the records decoded with it."""

    template: Template
    records: list[Record]

    @property
    def set_id(self) -> int:
        return self.template.template_id


@dataclass(slots=True)
class TemplateSet:
    """A template or options template set: new templates and withdrawn template ids."""

    set_id: int
    templates: list[Template] = field(default_factory=list)
    withdrawals: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Message:
    """One decoded IPFIX message."""

    export_time: int
    sequence_number: int
    observation_domain_id: int
    sets: list[DataSet | TemplateSet]
    length: int = 0
    unknown_template_sets: int = 0  # data sets skipped because their template is unknown
    ignored_withdrawals: int = 0  # withdrawals received over UDP, ignored per RFC 7011 8.4

    def data_records(self) -> Iterator[tuple[Template, Record]]:
        """Every data record with its template, in message order. Iterators chained in C
        rather than a generator: no Python frame is resumed per record; with the
        accelerator one iterator of its own (accel.data_records_iterator), one call per
        record instead of four, which gives the very same pairs."""
        pairs = [(s.template, s.records) for s in self.sets if isinstance(s, DataSet)]
        if _data_records is not None:
            try:
                it: Iterator[tuple[Template, Record]] = _data_records(pairs)
                return it
            except TypeError:  # records that are not a list (a caller's own): the twin's way
                pass
        return chain.from_iterable([zip(repeat(template), records) for template, records in pairs])

    @property
    def record_count(self) -> int:
        return sum(len(s.records) for s in self.sets if isinstance(s, DataSet))


# --------------------------------------------------------------------------- exporting


class ExportSession:
    """The exporting half of one transport session and observation domain."""

    def __init__(
        self,
        observation_domain_id: int = 0,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        registry: Registry | None = None,
        dense_templates: bool = False,
    ) -> None:
        if not 0 <= observation_domain_id <= 0xFFFFFFFF:
            raise UsageError(f"observation domain id {observation_domain_id} is outside 0..4294967295")
        if not HEADER.size + SET_HEADER.size + 1 <= max_message_size <= MAX_MESSAGE_SIZE:
            raise UsageError(f"max message size {max_message_size} is outside 21..{MAX_MESSAGE_SIZE}")
        self.observation_domain_id = observation_domain_id
        self.max_message_size = max_message_size
        self.registry = registry or default_registry()
        self.templates: dict[int, Template] = {}
        self.sequence_number = 0  # data records sent so far in this domain, modulo 2**32
        # Packing. Every message this session encodes holds exactly one set, and by default
        # every template set exactly one template record: RFC 7011 allows more of both, but
        # go-ipfix (Antrea's agent, aggregator and collector) reads only the first set of a
        # message and the first template of a set, and over TCP closes the session at data
        # for a template it never learned. ``dense_templates`` packs as many templates into
        # one set as fit, for peers that read all of them (fewer messages at session start).
        self.dense_templates = dense_templates

    def add_template(self, template: Template) -> None:
        old = self.templates.get(template.template_id)
        if old is not None and old != template:
            raise UsageError(
                f"template id {template.template_id} is already in use with other fields; "
                "withdraw it first (or pick another id)"
            )
        # A template longer than the session's messages (a wide template over UDP with a small
        # path MTU) is announced alone in a longer message, which IP fragments; only one that
        # no IPFIX message can hold is refused.
        if template.wire_length() + HEADER.size + SET_HEADER.size > MAX_MESSAGE_SIZE:
            raise UsageError(f"template {template.template_id} does not fit in a {MAX_MESSAGE_SIZE}-octet message")
        self.templates[template.template_id] = template

    def _header(self, length: int, export_time: int) -> bytes:
        if not 0 <= export_time <= 0xFFFFFFFF:
            raise UsageError(f"export time {export_time} is outside the 32-bit range of seconds")
        return HEADER.pack(VERSION, length, export_time, self.sequence_number, self.observation_domain_id)

    def encode_templates(self, export_time: int, template_ids: Sequence[int] | None = None) -> list[bytes]:
        """Messages announcing the templates (all of them by default), for the start of a
        session and for periodic refreshes over UDP."""
        ids = list(self.templates) if template_ids is None else list(template_ids)
        by_set: dict[int, list[bytes]] = {TEMPLATE_SET_ID: [], OPTIONS_TEMPLATE_SET_ID: []}
        for tid in ids:
            t = self._template(tid)
            by_set[OPTIONS_TEMPLATE_SET_ID if t.is_options else TEMPLATE_SET_ID].append(t.to_bytes())
        return self._pack_sets(by_set, export_time)

    def encode_withdrawal(self, template_ids: Sequence[int] | None, export_time: int) -> list[bytes]:
        """Template withdrawal messages (RFC 7011 8.1): the given ids, or all templates
        (ids 2 and 3) when ``template_ids`` is None. Never send these over UDP (8.4)."""
        by_set: dict[int, list[bytes]] = {TEMPLATE_SET_ID: [], OPTIONS_TEMPLATE_SET_ID: []}
        if template_ids is None:
            by_set[TEMPLATE_SET_ID].append(struct.pack("!HH", TEMPLATE_SET_ID, 0))
            by_set[OPTIONS_TEMPLATE_SET_ID].append(struct.pack("!HH", OPTIONS_TEMPLATE_SET_ID, 0))
            self.templates.clear()
        else:
            for tid in template_ids:
                t = self._template(tid)
                set_id = OPTIONS_TEMPLATE_SET_ID if t.is_options else TEMPLATE_SET_ID
                by_set[set_id].append(struct.pack("!HH", tid, 0))
                del self.templates[tid]
        return self._pack_sets(by_set, export_time)

    def _pack_sets(self, by_set: dict[int, list[bytes]], export_time: int) -> list[bytes]:
        limit = self.max_message_size - HEADER.size - SET_HEADER.size
        messages: list[bytes] = []
        for set_id, items in by_set.items():
            chunk: list[bytes] = []
            size = 0
            for item in items:
                if chunk and (not self.dense_templates or size + len(item) > limit):
                    messages.append(self._message([(set_id, chunk)], export_time))
                    chunk, size = [], 0
                chunk.append(item)
                size += len(item)
            if chunk:
                messages.append(self._message([(set_id, chunk)], export_time))
        return messages

    def _message(self, sets: list[tuple[int, list[bytes]]], export_time: int) -> bytes:
        body = []
        for set_id, items in sets:
            payload = b"".join(items)
            body.append(SET_HEADER.pack(set_id, SET_HEADER.size + len(payload)))
            body.append(payload)
        data = b"".join(body)
        return self._header(HEADER.size + len(data), export_time) + data

    def _template(self, template_id: int) -> Template:
        try:
            return self.templates[template_id]
        except KeyError:
            raise UsageError(f"template {template_id} was never added to this export session") from None

    def encode_records(
        self, template_id: int, records: Sequence[Record], export_time: int, *, max_message_size: int | None = None
    ) -> list[bytes]:
        """Data records in as few messages as fit ``max_message_size`` (the session's unless
        given for this call); each message's sequence number counts the data records sent
        before it. A record too long for one message raises :class:`RecordTooLarge`."""
        t = self._template(template_id)
        if not records:
            return []
        encode = t.encode_record
        msg_size = self.max_message_size if max_message_size is None else max_message_size
        if not HEADER.size + SET_HEADER.size + 1 <= msg_size <= MAX_MESSAGE_SIZE:
            raise UsageError(f"max message size {msg_size} is outside 21..{MAX_MESSAGE_SIZE}")
        if not 0 <= export_time <= 0xFFFFFFFF:
            raise UsageError(f"export time {export_time} is outside the 32-bit range of seconds")
        limit = msg_size - HEADER.size - SET_HEADER.size
        fixed = t.fixed_record_length
        if fixed is not None and limit // fixed == 0:
            raise RecordTooLarge(
                f"a record of template {template_id} ({fixed} octets) does not fit in a {msg_size}-octet message"
            )
        native = t._native
        if native is not None:  # the C accelerator (accel.py); it calls encode for what it leaves
            messages, oversize = native.encode_messages(
                records, limit, encode, export_time, self.sequence_number, self.observation_domain_id, template_id
            )
        else:
            messages, oversize = self._encode_messages_py(template_id, records, limit, encode, export_time)
        if oversize:
            raise RecordTooLarge(
                f"a record of template {template_id} is {oversize} octets, more than fits in a {msg_size}-octet message"
            )
        # Counted once all are encoded: a record that fails to encode sends none of them.
        self.sequence_number = (self.sequence_number + len(records)) & 0xFFFFFFFF
        return messages

    @property
    def data_set_limit(self) -> int:
        """The most octets of data records one message of this session carries (its size
        less the message and set headers): what :meth:`encode_data_sets` takes a set of."""
        return self.max_message_size - HEADER.size - SET_HEADER.size

    def encode_data_sets(self, template_id: int, sets: Sequence[tuple[bytes, int]], export_time: int) -> list[bytes]:
        """One message per data set already encoded: ``(payload, records)``, the data
        records of ``template_id`` back to back (what ``encode_record`` gives for each,
        at most :attr:`data_set_limit` octets, for a caller with its own encoder, such as
        the Flow Aggregator's C export). Each message's sequence number counts the data
        records sent before it; a set that does not fit raises :class:`RecordTooLarge`,
        anything else that is not such a pair UsageError, and then none is sent."""
        self._template(template_id)
        if not 0 <= export_time <= 0xFFFFFFFF:
            raise UsageError(f"export time {export_time} is outside the 32-bit range of seconds")
        limit = self.data_set_limit
        messages: list[bytes] = []
        sequence = self.sequence_number
        for payload, count in sets:
            if type(payload) is not bytes or type(count) is not int or count < 1:
                raise UsageError("a data set is (payload bytes, number of records >= 1)")
            if len(payload) > limit:
                raise RecordTooLarge(f"a data set of template {template_id} is {len(payload)} octets, "
                                     f"more than fits in a {self.max_message_size}-octet message")
            messages.append(self._data_message(SET_HEADER.pack(template_id, SET_HEADER.size + len(payload)), payload,
                                               export_time, sequence))
            sequence = (sequence + count) & 0xFFFFFFFF
        self.sequence_number = sequence
        return messages

    def _encode_messages_py(
        self, template_id: int, records: Sequence[Record], limit: int, encode: Callable[[Record], bytes], export_time: int
    ) -> tuple[list[bytes], int]:
        """encode_records' messages by the pure-Python codec: (messages, 0), or ([], n) when
        a record of n octets does not fit in ``limit`` octets of set payload."""
        set_head = SET_HEADER.pack
        messages: list[bytes] = []
        sequence = self.sequence_number
        fixed = self._template(template_id).fixed_record_length
        if fixed is not None:
            per_message = limit // fixed
            for start in range(0, len(records), per_message):
                payload = b"".join([encode(r) for r in records[start : start + per_message]])
                messages.append(self._data_message(set_head(template_id, SET_HEADER.size + len(payload)), payload, export_time, sequence))
                sequence = (sequence + per_message) & 0xFFFFFFFF
            return messages, 0
        encoded = [encode(r) for r in records]
        for item in encoded:
            if len(item) > limit:
                return [], len(item)
        start = 0
        size = 0
        for i, item in enumerate(encoded):
            n = len(item)
            if size + n > limit:
                payload = b"".join(encoded[start:i])
                messages.append(self._data_message(set_head(template_id, SET_HEADER.size + len(payload)), payload, export_time, sequence))
                sequence = (sequence + i - start) & 0xFFFFFFFF
                start, size = i, 0
            size += n
        payload = b"".join(encoded[start:])
        messages.append(self._data_message(set_head(template_id, SET_HEADER.size + len(payload)), payload, export_time, sequence))
        return messages, 0

    def _data_message(self, set_header: bytes, payload: bytes, export_time: int, sequence: int) -> bytes:
        length = HEADER.size + len(set_header) + len(payload)
        return HEADER.pack(VERSION, length, export_time, sequence, self.observation_domain_id) + set_header + payload


# --------------------------------------------------------------------------- collecting


@dataclass(slots=True)
class _DomainState:
    templates: dict[int, tuple[Template, float]] = field(default_factory=dict)
    expected_sequence: int | None = None


class Decoder:
    """The collecting half of one transport session: templates per observation domain.

    ``transport`` decides the RFC 7011 rules that differ between UDP and streams.
    ``template_lifetime`` (seconds) expires UDP templates not refreshed in time; it is
    ignored for streams, whose templates live as long as the session.

    Limits, so that one session cannot make us hold or do without bound: at most
    ``max_templates`` templates and ``max_session_fields`` fields across them, at most
    ``max_template_fields`` fields in one template (past a limit the message is malformed
    over a stream; over UDP the template is skipped and counted in ``templates_refused``),
    at most ``max_domains`` observation domains (the least recently used one is forgotten,
    with its templates, counted in ``domains_evicted``), and new template layouts compiled
    only as ``compile_budget`` allows (over a stream :class:`Deferred` is raised: decode
    the message again later; over UDP the template is skipped and counted).

    Expiry is cheap: domains are kept in least-recently-used order and UDP templates in
    the order they expire (every template has the same lifetime, so the order they were
    last refreshed in), so expiring costs only what expires, never a scan.

    Loss accounting (``lost_records``): the sequence number of a message counts the data
    records sent before it in its domain (RFC 7011 3.1), so a gap ahead of what we
    expected is records that never arrived. A peer chooses its sequence numbers, so the
    count is what peers claim, sanity-checked: a jump ahead of more than
    ``max_sequence_gap`` records in one message, or behind (reordering, an exporter
    restart), is counted in ``sequence_jumps`` and resynchronises instead of counting loss.
    """

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        transport: Transport = "tcp",
        template_lifetime: float | None = None,
        max_templates: int = 4096,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_template_fields: int = 1024,
        max_session_fields: int = 65536,
        max_domains: int = 1024,
        max_sequence_gap: int = 1 << 20,
        compile_budget: CompileBudget | None = None,
    ) -> None:
        self.registry = registry or default_registry()
        self.transport = transport
        self.template_lifetime = template_lifetime if transport == "udp" else None
        self.max_templates = max_templates
        self.max_message_size = max_message_size
        self.max_template_fields = max_template_fields
        self.max_session_fields = max_session_fields
        self.max_domains = max_domains
        self.max_sequence_gap = max_sequence_gap
        self.compile_budget = compile_budget
        self.domains: OrderedDict[int, _DomainState] = OrderedDict()  # least recently used first
        self._expiry: OrderedDict[tuple[int, int], float] = OrderedDict()  # (domain, template id) -> until
        self.template_count = 0
        self.field_count = 0  # fields of the templates held
        self.lost_records = 0  # data records the sequence numbers say we never saw
        self.sequence_jumps = 0  # implausible sequence numbers, resynchronised on
        self.templates_refused = 0  # UDP: templates over a limit or the compile budget, skipped
        self.domains_evicted = 0

    #: What :meth:`decode` builds; a decoder whose data sets take another form (the
    #: columns of :mod:`ipfix.columnar`) names its message class and :meth:`_data_set`.
    message_class: type[Message] = Message

    def _data_set(self, msg: Message, template: Template, data: bytes, body: int, end: int) -> None:
        """Decode the data set of a known template in ``data[body:end]`` into ``msg``."""
        msg.sets.append(DataSet(template, template.decode_records(data, body, end)))

    def templates(self, observation_domain_id: int = 0) -> dict[int, Template]:
        d = self.domains.get(observation_domain_id)
        return {tid: t for tid, (t, _) in d.templates.items()} if d else {}

    def _drop(self, state: _DomainState, domain: int, template_id: int) -> None:
        entry = state.templates.pop(template_id, None)
        if entry is not None:
            self.template_count -= 1
            self.field_count -= len(entry[0].fields)
            self._expiry.pop((domain, template_id), None)

    def expire(self, now: float) -> int:
        """Drop UDP templates past their lifetime; returns how many were dropped."""
        if self.template_lifetime is None:
            return 0
        expiry = self._expiry
        dropped = 0
        while expiry:
            key, until = next(iter(expiry.items()))
            if until > now:
                break
            del expiry[key]
            state = self.domains.get(key[0])
            if state is not None:
                entry = state.templates.pop(key[1], None)
                if entry is not None:
                    self.template_count -= 1
                    self.field_count -= len(entry[0].fields)
                    dropped += 1
        return dropped

    def _domain(self, domain: int) -> _DomainState:
        domains = self.domains
        state = domains.get(domain)
        if state is not None:
            domains.move_to_end(domain)
            return state
        while len(domains) >= self.max_domains:
            old, old_state = domains.popitem(last=False)
            for tid in list(old_state.templates):
                self._drop(old_state, old, tid)
            self.domains_evicted += 1
        state = domains[domain] = _DomainState()
        return state

    def decode(self, data: bytes, now: float = 0.0) -> Message:
        """Decode one complete message. Raises :class:`MalformedMessage` for a peer's error,
        :class:`Deferred` when the compile budget says later."""
        if not isinstance(data, bytes):
            data = bytes(data)
        n = len(data)
        if n < HEADER.size:
            raise MalformedMessage(f"message of {n} octets is shorter than the 16-octet header")
        version, length, export_time, sequence, domain = HEADER.unpack_from(data, 0)
        if version != VERSION:
            raise MalformedMessage(f"version {version} is not IPFIX (10)")
        if length != n:
            raise MalformedMessage(f"header says {length} octets but the message has {n}")
        if length > self.max_message_size:
            raise MalformedMessage(f"message of {length} octets exceeds the {self.max_message_size}-octet limit")
        if self.template_lifetime is not None:
            self.expire(now)
        state = self._domain(domain)
        msg = self.message_class(export_time, sequence, domain, [], length)
        off = HEADER.size
        while off < n:
            if n - off < SET_HEADER.size:
                raise MalformedMessage(f"{n - off} stray octets after the last set")
            set_id, set_length = SET_HEADER.unpack_from(data, off)
            if set_length < SET_HEADER.size:
                raise MalformedMessage(f"set {set_id} claims a length of {set_length} octets")
            end = off + set_length
            if end > n:
                raise MalformedMessage(f"set {set_id} of {set_length} octets runs past the end of the message")
            body = off + SET_HEADER.size
            if set_id >= MIN_DATA_SET_ID:
                entry = state.templates.get(set_id)
                if entry is None:
                    if self.transport != "udp":
                        raise MalformedMessage(f"data set for unknown template {set_id} in domain {domain}")
                    msg.unknown_template_sets += 1
                else:
                    self._data_set(msg, entry[0], data, body, end)
            elif set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
                msg.sets.append(self._template_set(set_id, data, body, end, state, msg, now))
            # set ids 0, 1 and 4..255 are reserved (RFC 7011 3.3.2): skipped
            off = end
        self._count_sequence(state, msg)
        return msg

    def _count_sequence(self, state: _DomainState, msg: Message) -> None:
        expected = state.expected_sequence
        if expected is not None:
            gap = (msg.sequence_number - expected) & 0xFFFFFFFF
            if 0 < gap <= self.max_sequence_gap:  # ahead of what we expected: records went missing
                self.lost_records += gap
            elif gap:  # far ahead, or behind: not a loss we can vouch for
                self.sequence_jumps += 1
        state.expected_sequence = (msg.sequence_number + msg.record_count) & 0xFFFFFFFF

    def _refuse(self, what: str) -> None:
        if self.transport != "udp":
            raise MalformedMessage(what)
        self.templates_refused += 1

    def _template_set(
        self, set_id: int, data: bytes, off: int, end: int, state: _DomainState, msg: Message, now: float
    ) -> TemplateSet:
        ts = TemplateSet(set_id)
        options = set_id == OPTIONS_TEMPLATE_SET_ID
        head = 6 if options else 4
        lookup = self.registry.lookup
        domain = msg.observation_domain_id
        while end - off >= 4:  # anything shorter is padding
            template_id, count = struct.unpack_from("!HH", data, off)
            if template_id == 0 and not any(data[off:end]):
                break  # zero padding at the end of the set (RFC 7011 3.3.1)
            if count == 0:
                # A withdrawal has the 4-octet header even in an options template set.
                off += 4
                self._withdraw(set_id, template_id, state, ts, msg)
                continue
            scope = 0
            if options:
                if end - off < head:
                    raise MalformedMessage(f"options template {template_id} is truncated before its scope count")
                (scope,) = struct.unpack_from("!H", data, off + 4)
            if template_id < MIN_DATA_SET_ID:
                raise MalformedMessage(f"template id {template_id} is reserved (ids start at 256)")
            if options and not 1 <= scope <= count:
                raise MalformedMessage(f"options template {template_id}: scope field count {scope} of {count} fields")
            off += head
            if count > self.max_template_fields:
                # skip its field specifiers without building them
                skip = off
                for _ in range(count):
                    if end - skip < 4:
                        raise MalformedMessage(f"template {template_id} is truncated: {count} fields announced")
                    element_id = (data[skip] << 8) | data[skip + 1]
                    skip += 8 if element_id & 0x8000 else 4
                off = skip
                self._refuse(f"template {template_id} has {count} fields, more than the limit of {self.max_template_fields}")
                continue
            fields = []
            for _ in range(count):
                if end - off < 4:
                    raise MalformedMessage(f"template {template_id} is truncated: {count} fields announced")
                element_id, length = struct.unpack_from("!HH", data, off)
                off += 4
                pen = 0
                if element_id & 0x8000:
                    if end - off < 4:
                        raise MalformedMessage(f"template {template_id} is truncated inside an enterprise field")
                    (pen,) = struct.unpack_from("!I", data, off)
                    off += 4
                    element_id &= 0x7FFF
                if length == 0:
                    raise MalformedMessage(f"template {template_id}: field ({pen}/{element_id}) has length 0")
                fields.append(FieldSpecifier(lookup(pen, element_id), length))
            old = state.templates.get(template_id)
            if old is not None and old[0].fields == tuple(fields) and old[0].scope_field_count == scope:
                template = old[0]  # a refresh (or a message decoded again): nothing to compile
            else:
                if old is None and self.template_count >= self.max_templates:
                    self._refuse(f"more than {self.max_templates} templates in one session")
                    continue
                held = self.field_count - (len(old[0].fields) if old is not None else 0)
                if held + count > self.max_session_fields:
                    self._refuse(f"more than {self.max_session_fields} template fields in one session")
                    continue
                if old is not None and self.transport != "udp":
                    raise MalformedMessage(
                        f"template {template_id} redefined without a withdrawal (RFC 7011 8.1) in domain {domain}"
                    )
                budget = self.compile_budget
                if budget is not None and not is_compiled(fields) and not budget.take(count, now):
                    if self.transport != "udp":
                        raise Deferred(f"template {template_id}: the template compile budget is spent",
                                       budget.wait(now))
                    self.templates_refused += 1
                    continue
                try:
                    template = Template(template_id, fields, scope)
                except Exception as exc:  # a template we cannot represent is the peer's error
                    raise MalformedMessage(f"template {template_id}: {exc}") from None
                if old is not None:
                    self._drop(state, domain, template_id)
                self.template_count += 1
                self.field_count += count
            until = now + self.template_lifetime if self.template_lifetime is not None else float("inf")
            state.templates[template_id] = (template, until)
            if self.template_lifetime is not None:
                key = (domain, template_id)
                self._expiry[key] = until
                self._expiry.move_to_end(key)
            ts.templates.append(template)
        return ts

    def _withdraw(self, set_id: int, template_id: int, state: _DomainState, ts: TemplateSet, msg: Message) -> None:
        if self.transport == "udp":
            msg.ignored_withdrawals += 1  # RFC 7011 8.4: not used over UDP, ignored
            return
        ts.withdrawals.append(template_id)
        if template_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):  # withdraw all (8.1)
            want_options = template_id == OPTIONS_TEMPLATE_SET_ID
            for tid in [tid for tid, (t, _) in state.templates.items() if t.is_options == want_options]:
                self._drop(state, msg.observation_domain_id, tid)
        elif template_id >= MIN_DATA_SET_ID:
            self._drop(state, msg.observation_domain_id, template_id)
        else:
            raise MalformedMessage(f"withdrawal of reserved template id {template_id}")


class MessageFramer:
    """Cuts an IPFIX byte stream (TCP, TLS) into messages by their header length."""

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self.max_message_size = max_message_size

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete messages now available."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        off = 0
        n = len(buf)
        while n - off >= 4:
            version, length = struct.unpack_from("!HH", buf, off)
            if version != VERSION:
                raise MalformedMessage(f"stream lost sync: version {version} where an IPFIX header should start")
            if length < HEADER.size:
                raise MalformedMessage(f"message length {length} is shorter than the header")
            if length > self.max_message_size:
                raise MalformedMessage(f"message of {length} octets exceeds the {self.max_message_size}-octet limit")
            if n - off < length:
                break
            out.append(bytes(buf[off : off + length]))
            off += length
        if off:
            del buf[:off]
        return out

    @property
    def pending(self) -> int:
        """Octets of an incomplete message still buffered (a truncated stream if the session ends now)."""
        return len(self._buf)

