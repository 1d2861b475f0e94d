"""The dashboards' web server: an aiohttp application serving the pages and their JSON.

Two kinds of routes, and nothing else:

* the page shell and its assets (``/``, ``/static/...``): HTML, CSS, the script and the
  ECharts bundle vendored from the npm registry by ``scripts/setup.sh``; they carry no flow
  data, so a browser may load them before it has a token;
* the panels' JSON (``/ui/v1/<panel>``: summary, series, top, sankey, heatmap, flows,
  values, complete, pairs) and a whole page's (``/ui/v1/page?d=...``: its panels as JSON
  lines, each when ready), answered by :class:`flowscope.collector.ui.dashboards.Dashboards`
  from the store's query layer, in a worker thread (the store's calls block).

* the what-if page's evaluation (``POST /ui/v1/whatif``, :mod:`.whatif`): proposed
  policies in a bounded JSON body, evaluated against the stored flows.

It changes nothing: every route but the what-if is GET, and the what-if only reads the
store. Who may read it follows :mod:`flowscope.webauth`:
open on loopback, otherwise a bearer token, mutual TLS, or ``insecure`` said out loud
(:func:`check_exposure` runs before anything listens). Bad input answers 400 with
``{"error": ..., "field": ...}``, naming the parameter; no user text reaches SQL except
through the filter language's parser, and no user text reaches HTML unescaped (the pages
escape it; the Content-Security-Policy forbids inline and foreign scripts besides).

:func:`start_ui` runs the application on an event loop until :meth:`UIServer.close`;
the ``--ui`` options every command shares are in :mod:`.options`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from flowscope.collector import query
from flowscope.webauth import PUBLIC_PATHS, WebAuth, auth_middleware

from .dashboards import Dashboards, PanelError, page_panels
from .options import DEFAULT_UI, UIConfig, add_ui_options, ui_from_args
from .whatif import whatif_handler

__all__ = ["DEFAULT_UI", "STATIC", "UIConfig", "UIServer", "add_ui_options", "add_ui_routes", "build_app", "start_ui",
           "ui_from_args"]

log = logging.getLogger("flowscope.collector.ui")

STATIC: Final = Path(__file__).resolve().parent / "static"
ASSETS: Final[dict[str, tuple[str, str]]] = {
    "/static/app.js": ("app.js", "text/javascript"),
    "/static/app.css": ("app.css", "text/css"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/static/vendor/echarts.min.js": ("vendor/echarts.min.js", "text/javascript"),
}
PANELS: Final = ("summary", "series", "top", "sankey", "heatmap", "flows", "values", "complete", "pairs")
CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
              "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":"), allow_nan=False), status=status,
                        content_type="application/json", headers=SECURITY_HEADERS)


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    fields = list(rows[0]) if rows else list(query._DISPLAY)
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        # A spreadsheet must not run a formula a flow's name happens to start with.
        writer.writerow({k: (f"'{v}" if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v)
                         for k, v in r.items()})
    return out.getvalue()


def build_app(store: query.Backend, auth: WebAuth | None = None, *, now: Callable[[], float] = time.time,
              api: bool = True) -> web.Application:
    """The dashboards over ``store``, protected by ``auth``; with ``api``, the store's JSON
    query API (:mod:`flowscope.collector.api`, ``/api/v1/...``) in the same application, so
    one address serves both the pages and the scripts that read what they show."""
    auth = auth or WebAuth()
    public = set(PUBLIC_PATHS) | {"/"} | set(ASSETS)
    app = web.Application(middlewares=[auth_middleware(auth, public)])
    if api:
        from flowscope.collector.api import add_routes

        add_routes(app, store)  # type: ignore[arg-type,unused-ignore]  # any query-layer backend will do
    add_ui_routes(app, store, now=now)
    return app


def add_ui_routes(app: web.Application, store: query.Backend, *, now: Callable[[], float] = time.time,
                  workers: int = 2) -> None:
    """Add the pages (``/``, ``/static/...``) and their panels (``/ui/v1/...``) to ``app``
    (and /healthz, /readyz when nothing else answers them). The caller puts the
    authentication middleware on ``app``: the pages are public, the panels are not."""
    dashboards = Dashboards(store, now=now)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flowscope-ui")

    async def on_cleanup(_: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(on_cleanup)

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={**SECURITY_HEADERS, "Content-Type": "text/html"})

    async def asset(request: web.Request) -> web.StreamResponse:
        name, ctype = ASSETS[request.path]
        path = STATIC / name
        if not path.is_file():
            return web.Response(status=503, text=f"{name} is missing: run scripts/setup.sh (it vendors ECharts "
                                                 "from the npm registry)", headers=SECURITY_HEADERS)
        headers = {**SECURITY_HEADERS, "Content-Type": ctype, "Cache-Control": "public, max-age=300"}
        return web.FileResponse(path, headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers=SECURITY_HEADERS)

    def panel(name: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            duplicated = [k for k in request.query if len(request.query.getall(k)) > 1]
            if duplicated:
                return _json({"error": f"{duplicated[0]}: given more than once", "field": duplicated[0]}, 400)
            params: Mapping[str, str] = dict(request.query)
            loop = asyncio.get_running_loop()
            try:
                data = await loop.run_in_executor(executor, getattr(dashboards.scoped(), name), params)
            except PanelError as exc:
                return _json({"error": str(exc), "field": exc.field}, 400)
            except Exception as exc:  # the store failed: say so, keep serving
                log.warning("panel %s failed: %s", name, exc)
                return _json({"error": f"the store failed: {exc}", "field": "store"}, 503)
            if name == "flows" and params.get("format") in ("csv", "json"):
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now()))
                if params["format"] == "csv":
                    body, ctype = _csv(data["rows"]), "text/csv"
                else:
                    body, ctype = json.dumps(data["rows"], indent=1), "application/json"
                headers = {**SECURITY_HEADERS, "Content-Disposition":
                           f'attachment; filename="flowscope-flows-{stamp}.{params["format"]}"'}
                return web.Response(text=body, content_type=ctype, headers=headers)
            return _json(data)

        return handler

    async def page(request: web.Request) -> web.StreamResponse:
        """A whole dashboard in one request: its panels computed concurrently (sharing the
        questions two panels ask alike), each written as one JSON line as soon as it is
        ready, so the page draws a chart while the server still computes the next."""
        duplicated = [k for k in request.query if len(request.query.getall(k)) > 1]
        if duplicated:
            return _json({"error": f"{duplicated[0]}: given more than once", "field": duplicated[0]}, 400)
        params: Mapping[str, str] = dict(request.query)
        scope = dashboards.scoped()
        loop = asyncio.get_running_loop()
        try:
            panels = page_panels(params)
            # The range, filter and policy fields are the page's: refused once, up front.
            await loop.run_in_executor(executor, scope.check_common, panels[0][1])
        except PanelError as exc:
            return _json({"error": str(exc), "field": exc.field}, 400)
        except Exception as exc:  # the store failed: say so, keep serving
            log.warning("page %s failed: %s", params.get("d"), exc)
            return _json({"error": f"the store failed: {exc}", "field": "store"}, 503)
        resp = web.StreamResponse(headers={**SECURITY_HEADERS, "Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        pending = {loop.run_in_executor(executor, getattr(scope, name), p): i for i, (name, p) in enumerate(panels)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    line: dict[str, Any] = {"i": i, "panel": panels[i][0]}
                    try:
                        line["data"] = fut.result()
                    except PanelError as exc:
                        line.update(error=str(exc), field=exc.field, status=400)
                    except Exception as exc:  # noqa: BLE001 - one panel's store failure; the others still answer
                        log.warning("panel %s of page %s failed: %s", panels[i][0], params.get("d"), exc)
                        line.update(error=f"the store failed: {exc}", field="store", status=503)
                    await resp.write(json.dumps(line, separators=(",", ":"), allow_nan=False).encode() + b"\n")
        finally:
            for fut in pending:  # the browser went away: what has not started need not
                fut.cancel()
        await resp.write_eof()
        return resp

    app.router.add_get("/", index)
    for path in ASSETS:
        app.router.add_get(path, asset)
    taken = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    for probe in ("/healthz", "/readyz"):
        if probe not in taken:
            app.router.add_get(probe, healthz)
    for name in PANELS:
        app.router.add_get(f"/ui/v1/{name}", panel(name))
    app.router.add_get("/ui/v1/page", page)
    app.router.add_post("/ui/v1/whatif", whatif_handler(store, executor, _json))


# --------------------------------------------------------------------------- options and serving

class UIServer:
    """The dashboards listening on one address; :meth:`close` stops them."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, config: UIConfig) -> None:
        self.runner = runner
        self.site = site
        self.config = config

    @property
    def port(self) -> int:
        server = self.site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self.config.port

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        scheme = "https" if self.config.auth.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}/"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_ui(store: query.Backend, config: UIConfig, *, now: Callable[[], float] = time.time,
                   api: bool = True) -> UIServer:
    """Serve the dashboards (and, with ``api``, the JSON query API) over ``store`` on
    ``config``'s address, on the running loop. This is what ``flowscope collector --ui``
    calls with the store it writes."""
    app = build_app(store, config.auth, now=now, api=api)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=config.auth.ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"--ui: cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    return UIServer(runner, site, config)
