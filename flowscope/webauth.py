"""Who may read flowscope's HTTP endpoints: bearer tokens, mutual TLS, and no open doors.

The aggregator's flow-records API and the collector's dashboards hand out every flow of a
cluster, so both follow one rule: an endpoint on loopback may be open (only processes of
the same host, or ``kubectl port-forward``, reach it), an endpoint on any other address
must authenticate its clients with a bearer token (a file, mounted from a Secret) or with
mutual TLS (client certificates signed by a given CA), unless the user says ``insecure``
in so many words. :func:`check_exposure` enforces that at start, before anything is
opened; :func:`auth_middleware` enforces the token on every request of an aiohttp
application, except the few public paths a kubelet probe needs.

The shape is the same for every endpoint, so the configuration keys read alike::

    tokenFile: /etc/flowscope/api-token/token   # "Authorization: Bearer <token>"
    tls: {certFile: ..., keyFile: ..., caFile: ...}   # HTTPS; with caFile, client certs required
    insecure: false                              # true: serve a non-loopback address open
"""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "WebAuthError",
    "WebAuth",
    "is_loopback",
    "read_token",
    "server_ssl_context",
    "check_exposure",
    "auth_middleware",
    "PUBLIC_PATHS",
]

# Paths any client may read: what kubelet probes need, and nothing that carries flows.
PUBLIC_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz"})
MAX_TOKEN_BYTES = 4096


class WebAuthError(ValueError):
    """A configuration that would serve flows to anyone, or unreadable credentials."""


@dataclass(frozen=True, slots=True)
class WebAuth:
    """How one endpoint authenticates its clients (all empty: it does not)."""

    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    client_certs: bool = False  # the SSL context requires a client certificate
    insecure: bool = False

    @property
    def authenticates(self) -> bool:
        return self.token is not None or self.client_certs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path, key: str) -> str:
    """The token in ``path`` (surrounding whitespace removed), or :class:`WebAuthError` naming ``key``."""
    try:
        raw = Path(path).read_bytes()[: MAX_TOKEN_BYTES + 1]
    except OSError as e:
        raise WebAuthError(f"{key}: cannot read {str(path)!r}: {e.strerror or e}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise WebAuthError(f"{key}: {str(path)!r} is over {MAX_TOKEN_BYTES} bytes; a token is one line")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise WebAuthError(f"{key}: {str(path)!r} is not UTF-8 text") from None
    if len(token) < 16:
        raise WebAuthError(f"{key}: the token in {str(path)!r} has {len(token)} characters; use at least 16 "
                           "(e.g. `openssl rand -hex 32`)")
    if any(c.isspace() for c in token):
        raise WebAuthError(f"{key}: the token in {str(path)!r} contains whitespace; a token is one word")
    return token


def server_ssl_context(cert_file: str, key_file: str, ca_file: str | None, key: str) -> ssl.SSLContext:
    """HTTPS with TLS 1.2 or newer; with ``ca_file``, clients must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise WebAuthError(f"{key}.certFile/keyFile: cannot load {cert_file!r} and {key_file!r}: {e}") from None
    if ca_file:
        try:
            ctx.load_verify_locations(ca_file)
        except (OSError, ssl.SSLError) as e:
            raise WebAuthError(f"{key}.caFile: cannot load {ca_file!r}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def check_exposure(host: str, auth: WebAuth, key: str) -> None:
    """Refuse to serve flows open on a non-loopback address unless ``insecure`` was asked for."""
    if is_loopback(host) or auth.authenticates or auth.insecure:
        return
    raise WebAuthError(
        f"{key}: {host!r} is reachable from other hosts, but no client authentication is configured; "
        f"set a bearer token file or TLS with a client CA, listen on 127.0.0.1, "
        f"or set insecure to serve every flow to anyone who can connect"
    )


Handler = Callable[..., Awaitable[object]]


def auth_middleware(auth: WebAuth, public: Iterable[str] = PUBLIC_PATHS) -> Callable[..., Awaitable[object]]:
    """An aiohttp middleware answering 401 to requests without ``auth``'s bearer token."""
    from aiohttp import web

    public_paths = frozenset(public)
    expected = f"Bearer {auth.token}".encode() if auth.token is not None else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> object:
        if expected is not None and request.path not in public_paths:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                raise web.HTTPUnauthorized(
                    text='{"error": "a bearer token is required (Authorization: Bearer <token>)"}',
                    content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer realm="flowscope"'},
                )
        return await handler(request)

    return middleware
