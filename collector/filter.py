"""The filter language of ``flowscope flows --filter`` and the dashboards' filter box.

A small language, parsed here into a parameterised WHERE clause: the SQL text is made
only of this module's constants and column names from :mod:`flowscope.collector.schema`;
every value the user wrote becomes a parameter (``{p0:String}``, ``{p1:UInt64}``) that
:func:`bind` renders as a ClickHouse literal through one escaping encoder. User text is
never spliced into SQL, so quotes, comments and ``;`` in a value are just characters of
that value, and anything else (an unknown field, a stray symbol) is a :class:`FilterError`
naming the position and what was expected.

Grammar::

    expr   := term ("or" term)*
    term   := factor ("and" factor)*
    factor := "not" factor | "(" expr ")" | FIELD OP VALUE | FIELD ["not"] "in" "(" VALUE ("," VALUE)* ")"
    OP     := "=" | "!=" | "~" (contains) | "<" | "<=" | ">" | ">="
    VALUE  := "double quoted" | 'single quoted' | bare-word | number

Examples: ``namespace = "shop" and action = drop``, ``pod = shop/web-1 or port in (80, 443)``,
``not type = intra-node and bytes > 1000000``, ``service ~ "frontend"``.

Fields (:data:`FIELDS`) name what users think in. ``namespace``, ``pod``, ``node``,
``workload``, ``policy``, ``action``, ``port`` and ``ip`` match either end (or either
direction's policy); ``src*`` / ``dst*`` (and ``ingress*`` / ``egress*``) one. A ``pod``
value ``ns/name`` names both, ``name`` alone any namespace. ``action`` takes allow, drop,
reject (or none), ``type`` intra-node, inter-node, to-external, from-external (or host),
``protocol`` tcp, udp, icmp, sctp or a number. ``!=`` and ``not in`` on a two-ended field
mean neither end matches.

:func:`parse_filter` returns a :class:`Where` with the columns it reads, so the query
layer can tell whether a roll-up table holds them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from flowscope.ipfix.antrea import FLOW_TYPES, PROTOCOLS, RULE_ACTIONS

__all__ = ["FIELDS", "FilterError", "Field", "Where", "bind", "literal", "parse_filter"]

MAX_LENGTH: Final = 4096
MAX_VALUES: Final = 1000


class FilterError(ValueError):
    """A filter that is not in the language; the message names where and what is expected."""


Kind = Literal["string", "number", "action", "type", "protocol", "pod", "policy"]


@dataclass(frozen=True, slots=True)
class Field:
    """A filter field: the columns it reads (one per end it matches) and how values are read."""

    name: str
    kind: Kind
    columns: tuple[tuple[str, ...], ...]  # per end: (column,) or (namespace column, name column)
    doc: str


def _f(name: str, kind: Kind, doc: str, *ends: tuple[str, ...]) -> Field:
    return Field(name, kind, tuple(ends), doc)


_SNS, _DNS = ("sourcePodNamespace",), ("destinationPodNamespace",)
_SPOD, _DPOD = ("sourcePodNamespace", "sourcePodName"), ("destinationPodNamespace", "destinationPodName")
_SWL, _DWL = ("sourcePodNamespace", "sourcePodWorkload"), ("destinationPodNamespace", "destinationPodWorkload")
_IPOL = ("ingressNetworkPolicyNamespace", "ingressNetworkPolicyName")
_EPOL = ("egressNetworkPolicyNamespace", "egressNetworkPolicyName")

#: Every field the language knows, by name.
FIELDS: Final[dict[str, Field]] = {f.name: f for f in (
    _f("namespace", "string", "either Pod's namespace", _SNS, _DNS),
    _f("srcNamespace", "string", "source Pod's namespace", _SNS),
    _f("dstNamespace", "string", "destination Pod's namespace", _DNS),
    _f("pod", "pod", "either Pod (name or namespace/name)", _SPOD, _DPOD),
    _f("srcPod", "pod", "source Pod (name or namespace/name)", _SPOD),
    _f("dstPod", "pod", "destination Pod (name or namespace/name)", _DPOD),
    _f("workload", "pod", "either Pod's workload (name or namespace/name)", _SWL, _DWL),
    _f("srcWorkload", "pod", "source workload", _SWL),
    _f("dstWorkload", "pod", "destination workload", _DWL),
    _f("node", "string", "either Node", ("sourceNodeName",), ("destinationNodeName",)),
    _f("srcNode", "string", "source Node", ("sourceNodeName",)),
    _f("dstNode", "string", "destination Node", ("destinationNodeName",)),
    _f("service", "string", "destination Service port name (namespace/name:port)", ("destinationServicePortName",)),
    _f("policy", "policy", "ingress or egress policy (name or namespace/name)", _IPOL, _EPOL),
    _f("ingressPolicy", "policy", "ingress policy", _IPOL),
    _f("egressPolicy", "policy", "egress policy", _EPOL),
    _f("rule", "string", "ingress or egress rule name", ("ingressNetworkPolicyRuleName",),
       ("egressNetworkPolicyRuleName",)),
    _f("action", "action", "ingress or egress rule action: allow, drop, reject, none",
       ("ingressNetworkPolicyRuleAction",), ("egressNetworkPolicyRuleAction",)),
    _f("ingressAction", "action", "ingress rule action", ("ingressNetworkPolicyRuleAction",)),
    _f("egressAction", "action", "egress rule action", ("egressNetworkPolicyRuleAction",)),
    _f("type", "type", "flow type: intra-node, inter-node, to-external, from-external, host", ("flowType",)),
    _f("protocol", "protocol", "IP protocol: tcp, udp, icmp, sctp or a number", ("protocolIdentifier",)),
    _f("port", "number", "either transport port", ("sourceTransportPort",), ("destinationTransportPort",)),
    _f("srcPort", "number", "source port", ("sourceTransportPort",)),
    _f("dstPort", "number", "destination port", ("destinationTransportPort",)),
    _f("servicePort", "number", "destination Service port", ("destinationServicePort",)),
    _f("ip", "string", "either IP address", ("sourceIP",), ("destinationIP",)),
    _f("srcIP", "string", "source IP address", ("sourceIP",)),
    _f("dstIP", "string", "destination IP address", ("destinationIP",)),
    _f("clusterIP", "string", "destination Service ClusterIP", ("destinationClusterIP",)),
    _f("tcpState", "string", "TCP state", ("tcpState",)),
    _f("reason", "number", "flowEndReason (1 idle, 2 active, 3 end, 4 forced, 5 resources)", ("flowEndReason",)),
    _f("bytes", "number", "octets of the record, both directions", ("octetDeltaCount", "reverseOctetDeltaCount")),
    _f("packets", "number", "packets of the record, both directions",
       ("packetDeltaCount", "reversePacketDeltaCount")),
)}

_ACTION_VALUES: Final = {name.lower() or "none": num for num, name in RULE_ACTIONS.items()}
_TYPE_VALUES: Final = {name: num for num, name in FLOW_TYPES.items()}
_PROTOCOL_VALUES: Final = {name: num for num, name in PROTOCOLS.items()}
_ENUMS: Final = {"action": _ACTION_VALUES, "type": _TYPE_VALUES, "protocol": _PROTOCOL_VALUES}


@dataclass(frozen=True, slots=True)
class Where:
    """A WHERE clause with placeholders, its parameters, and the columns it reads."""

    sql: str = "1"
    params: Mapping[str, Any] = field(default_factory=dict)
    columns: frozenset[str] = frozenset()

    def and_(self, other: Where) -> Where:
        """Both clauses (parameter names must not clash: build with one :class:`Params`)."""
        if other.sql == "1":
            return self
        if self.sql == "1":
            return other
        return Where(f"({self.sql}) AND ({other.sql})", {**self.params, **other.params}, self.columns | other.columns)


class Params:
    """Names placeholders (``p0``, ``p1``, ...) with their ClickHouse types."""

    def __init__(self, prefix: str = "p") -> None:
        self.prefix = prefix
        self.values: dict[str, Any] = {}

    def add(self, value: Any, type_: str) -> str:
        name = f"{self.prefix}{len(self.values)}"
        self.values[name] = value
        return f"{{{name}:{type_}}}"


# --------------------------------------------------------------------------- binding

_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):(String|UInt64|Int64|Float64|UInt32)\}")


def literal(value: Any, type_: str) -> str:
    """A value as a ClickHouse literal of ``type_``; strings escaped (backslash and quote)."""
    if type_ == "String":
        if not isinstance(value, str):
            raise TypeError(f"{value!r} is not text")
        escaped = value.replace("\\", "\\\\").replace("'", "\\'")
        return "'" + "".join(c if c >= " " or c in "\t" else f"\\x{ord(c):02x}" for c in escaped) + "'"
    if type_ in ("UInt64", "UInt32", "Int64"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{value!r} is not an integer")
        return str(int(value))
    if type_ == "Float64":
        v = float(value)
        if v != v or v in (float("inf"), float("-inf")):
            raise TypeError(f"{value!r} is not a finite number")
        return repr(v)
    raise TypeError(f"no literal for type {type_}")


def bind(sql: str, params: Mapping[str, Any]) -> str:
    """The SQL with every ``{name:Type}`` placeholder replaced by its parameter's literal.

    One pass over the template: a parameter's text is never scanned again.
    """

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in params:
            raise KeyError(f"no parameter {m.group(1)!r}")
        return literal(params[m.group(1)], m.group(2))

    return _PLACEHOLDER.sub(sub, sql)


# --------------------------------------------------------------------------- lexer

_TOKEN: Final = re.compile(r"""
    (?P<ws>\s+)
  | (?P<op>!=|<=|>=|=|<|>|~|\(|\)|,)
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<sq>'(?:[^'\\]|\\.)*')
  | (?P<word>[A-Za-z0-9_./:*\-\[\]@]+)
""", re.VERBOSE)
_KEYWORDS: Final = frozenset(("and", "or", "not", "in"))


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # op, str, word, end
    text: str
    pos: int  # 1-based column


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", r"\1", body)


def _lex(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if not m:
            ch = text[i]
            if ch in "\"'":
                raise FilterError(f"filter: the quote at column {i + 1} is never closed")
            raise FilterError(f"filter: unexpected {ch!r} at column {i + 1}; values with symbols go in double quotes")
        kind = m.lastgroup or ""
        if kind == "op":
            out.append(_Tok("op", m.group(), i + 1))
        elif kind in ("dq", "sq"):
            out.append(_Tok("str", _unescape(m.group()[1:-1]), i + 1))
        elif kind == "word":
            out.append(_Tok("word", m.group(), i + 1))
        i = m.end()
    out.append(_Tok("end", "", len(text) + 1))
    return out


# --------------------------------------------------------------------------- parser

_OPS: Final = ("=", "!=", "~", "<", "<=", ">", ">=")


class _Parser:
    def __init__(self, text: str, params: Params) -> None:
        self.toks = _lex(text)
        self.i = 0
        self.params = params
        self.columns: set[str] = set()

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def keyword(self, word: str) -> bool:
        t = self.peek()
        if t.kind == "word" and t.text.lower() == word:
            self.i += 1
            return True
        return False

    def expect_op(self, op: str, what: str) -> None:
        t = self.next()
        if t.kind != "op" or t.text != op:
            raise FilterError(f"filter: expected {what} at column {t.pos}, found {_show(t)}")

    def expr(self) -> str:
        parts = [self.term()]
        while self.keyword("or"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def term(self) -> str:
        parts = [self.factor()]
        while self.keyword("and"):
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def factor(self) -> str:
        if self.keyword("not"):
            return f"NOT ({self.factor()})"
        t = self.peek()
        if t.kind == "op" and t.text == "(":
            self.next()
            inner = self.expr()
            self.expect_op(")", "')'")
            return inner
        return self.comparison()

    def comparison(self) -> str:
        t = self.next()
        if t.kind != "word" or t.text.lower() in _KEYWORDS:
            raise FilterError(f"filter: expected a field name at column {t.pos}, found {_show(t)}; "
                              f"fields: {', '.join(FIELDS)}")
        fld = FIELDS.get(t.text)
        if fld is None:
            close = [n for n in FIELDS if n.lower() == t.text.lower()]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise FilterError(f"filter: unknown field {t.text!r} at column {t.pos}{hint}; fields: {', '.join(FIELDS)}")
        negate = False
        if self.keyword("not"):
            negate = True
            if not self.keyword("in"):
                raise FilterError(f"filter: expected 'in' after '{t.text} not' at column {self.peek().pos}")
            return self.membership(fld, negate)
        if self.keyword("in"):
            return self.membership(fld, negate)
        op_tok = self.next()
        if op_tok.kind != "op" or op_tok.text not in _OPS:
            raise FilterError(f"filter: expected an operator ({' '.join(_OPS)} or in) after {t.text!r} "
                              f"at column {op_tok.pos}, found {_show(op_tok)}")
        op = op_tok.text
        value = self.value(fld)
        return self.compare(fld, op, [value])

    def membership(self, fld: Field, negate: bool) -> str:
        self.expect_op("(", "'(' after in")
        values = [self.value(fld)]
        while True:
            t = self.next()
            if t.kind == "op" and t.text == ")":
                break
            if t.kind != "op" or t.text != ",":
                raise FilterError(f"filter: expected ',' or ')' at column {t.pos}, found {_show(t)}")
            values.append(self.value(fld))
            if len(values) > MAX_VALUES:
                raise FilterError(f"filter: more than {MAX_VALUES} values in one list")
        return self.compare(fld, "!=" if negate else "=", values)

    def value(self, fld: Field) -> _Tok:
        t = self.next()
        if t.kind not in ("str", "word"):
            raise FilterError(f"filter: expected a value for {fld.name} at column {t.pos}, found {_show(t)}")
        return t

    # ---- one comparison, on every end the field matches
    def compare(self, fld: Field, op: str, values: list[_Tok]) -> str:
        negative = op == "!="
        pos_op = "=" if negative else op
        ends = []
        for cols in fld.columns:
            self.columns.update(cols)
            alts = [self.one(fld, cols, pos_op, v) for v in values]
            ends.append(alts[0] if len(alts) == 1 else "(" + " OR ".join(alts) + ")")
        any_end = ends[0] if len(ends) == 1 else "(" + " OR ".join(ends) + ")"
        return f"NOT {any_end}" if negative else any_end

    def one(self, fld: Field, cols: tuple[str, ...], op: str, tok: _Tok) -> str:
        if fld.kind in ("string", "pod", "policy"):
            if op not in ("=", "~"):
                raise FilterError(f"filter: {fld.name} is text; use =, !=, ~ (contains) or in, not {op!r} "
                                  f"(column {tok.pos})")
            if fld.kind in ("pod", "policy") and len(cols) == 2:
                ns, name = (tok.text.split("/", 1) if "/" in tok.text else (None, tok.text))
                conds = [self.text_cond(cols[1], op, name)]
                if ns is not None:
                    conds.insert(0, self.text_cond(cols[0], "=", ns))
                return conds[0] if len(conds) == 1 else "(" + " AND ".join(conds) + ")"
            return self.text_cond(cols[0], op, tok.text)
        if op == "~":
            raise FilterError(f"filter: ~ (contains) applies to text fields, not {fld.name} (column {tok.pos})")
        number = self.number(fld, tok)
        col = cols[0] if len(cols) == 1 else "(" + " + ".join(cols) + ")"
        return f"{col} {op} {self.params.add(number, 'UInt64')}"

    def text_cond(self, col: str, op: str, value: str) -> str:
        if op == "~":
            return f"position({col}, {self.params.add(value, 'String')}) > 0"
        return f"{col} = {self.params.add(value, 'String')}"

    def number(self, fld: Field, tok: _Tok) -> int:
        text = tok.text.lower()
        enum = _ENUMS.get(fld.kind)
        if enum is not None and text in enum:
            return enum[text]
        if fld.kind in ("action", "type"):
            raise FilterError(f"filter: {fld.name} {tok.text!r} at column {tok.pos} is not one of "
                              f"{', '.join(enum or ())}")
        if not text.isdigit() or len(text) > 19:
            allowed = f"a number or one of {', '.join(enum)}" if enum else "a whole number"
            raise FilterError(f"filter: {fld.name} {tok.text!r} at column {tok.pos} is not {allowed}")
        return int(text)


def _show(t: _Tok) -> str:
    if t.kind == "end":
        return "the end of the filter"
    return repr(t.text)


def parse_filter(text: str, params: Params | None = None) -> Where:
    """The WHERE clause of a filter expression (an empty filter matches every row).

    Raises :class:`FilterError` (one line, naming the column) for anything not in the language.
    """
    if not isinstance(text, str):
        raise FilterError(f"filter: expected text, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter: longer than {MAX_LENGTH} characters")
    if not text.strip():
        return Where()
    p = params or Params()
    parser = _Parser(text, p)
    sql = parser.expr()
    end = parser.peek()
    if end.kind != "end":
        raise FilterError(f"filter: unexpected {_show(end)} at column {end.pos}; join conditions with and / or")
    return Where(sql, dict(p.values), frozenset(parser.columns))


def field_names() -> Sequence[str]:
    """The fields, in documentation order (for the filter box's completion)."""
    return tuple(FIELDS)
