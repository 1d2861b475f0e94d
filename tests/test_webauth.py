"""flowscope.webauth against a real aiohttp server on loopback: tokens, mutual TLS, exposure."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from flowscope.webauth import WebAuth, WebAuthError, auth_middleware, check_exposure, read_token, server_ssl_context
from pki import make_pki

TOKEN = "0123456789abcdef0123456789abcdef"


async def _serve(auth: WebAuth) -> tuple[web.AppRunner, int]:
    async def flows(_: web.Request) -> web.Response:
        return web.json_response({"flows": [1, 2, 3]})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[auth_middleware(auth)])
    app.router.add_get("/flows", flows)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=auth.ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


async def test_bearer_token_is_required_except_on_public_paths() -> None:
    runner, port = await _serve(WebAuth(token=TOKEN))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/flows") as r:
                assert r.status == 401 and "Bearer" in r.headers["WWW-Authenticate"]
            async with http.get(f"http://127.0.0.1:{port}/flows", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(f"http://127.0.0.1:{port}/flows", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200 and (await r.json()) == {"flows": [1, 2, 3]}
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200 and await r.text() == "ok"
    finally:
        await runner.cleanup()


async def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    ctx = server_ssl_context(pki["server_cert"], pki["server_key"], pki["ca"], "api.tls")
    runner, port = await _serve(WebAuth(ssl_context=ctx, client_certs=True))
    try:
        anonymous = ssl.create_default_context(cafile=pki["ca"])
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"https://127.0.0.1:{port}/flows", ssl=anonymous) as r:
                    await r.read()
            client = ssl.create_default_context(cafile=pki["ca"])
            client.load_cert_chain(pki["client_cert"], pki["client_key"])
            async with http.get(f"https://127.0.0.1:{port}/flows", ssl=client) as r:
                assert r.status == 200
    finally:
        await runner.cleanup()


def test_open_endpoint_off_loopback_is_refused_naming_the_key() -> None:
    check_exposure("127.0.0.1", WebAuth(), "apiAddress")
    check_exposure("::1", WebAuth(), "apiAddress")
    check_exposure("0.0.0.0", WebAuth(token=TOKEN), "apiAddress")
    check_exposure("0.0.0.0", WebAuth(insecure=True), "apiAddress")
    with pytest.raises(WebAuthError, match=r"^apiAddress: '0.0.0.0' is reachable from other hosts"):
        check_exposure("0.0.0.0", WebAuth(), "apiAddress")
    # TLS without a client CA encrypts but lets anyone read: still refused.
    with pytest.raises(WebAuthError):
        check_exposure("10.0.0.1", WebAuth(ssl_context=ssl.create_default_context(), client_certs=False), "ui")


def test_token_files_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text(TOKEN + "\n")
    assert read_token(good, "api.tokenFile") == TOKEN
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(WebAuthError, match=r"^api.tokenFile: .* has 3 characters"):
        read_token(short, "api.tokenFile")
    with pytest.raises(WebAuthError, match=r"^api.tokenFile: cannot read"):
        read_token(tmp_path / "missing", "api.tokenFile")
    spaced = tmp_path / "spaced"
    spaced.write_text("0123456789abcdef 0123456789abcdef")
    with pytest.raises(WebAuthError, match="whitespace"):
        read_token(spaced, "api.tokenFile")
