"""The page's routes: `/` and the JSON beside it (pinned by issue 24, docs/observability.md).

    GET  /api/state              the retained state the daemon publishes
    GET  /api/results?n=&ng=1&after=SEQ  the last N results (newest first; after: only later ones), thumbnails
    GET  /api/results/{id}       one result's full verdict message
    GET  /api/stats              since start and since the last reset
    GET  /api/live               the latest judged part; /api/live/frame.jpg, /api/live/crop.png its pictures
    GET  /api/crops/{id}.jpg     a kept crop's thumbnail ({id}.png: the crop itself)
    POST /api/command            {"cmd": "pause" | "resume" | "reload" | "product", "product": NAME}: the MQTT
                                 command's path and answer
    GET  /api/products           the configured products (a changeover's choices) and the current one
    POST /api/stats/reset        the since-reset figures start again
    GET  /api/me, POST /api/login, POST /api/logout

Every request from the network is answered, never with a traceback: a bug in a handler is a 500 with
a sentence, logged with its traceback for the station's developers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import reprlib

from aiohttp import web

from station.runtime.web.auth import csrf_matches
from station.runtime.web.users import MAX_PASSWORD, check_password, dummy_hash, role_may
from station.core.errors import DataError

log = logging.getLogger("station.runtime.web")

COOKIE = "station_session"
STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
OPEN_USER = "local"  # who acts on the open page (loopback, no users)
COMMANDS = {"pause": "operator", "resume": "operator", "reload": "operator", "product": "operator"}
COMMAND_TIMEOUT = 30.0  # seconds: a reload loads a model; longer than that the station is stuck, and says so
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_shown = reprlib.Repr()
_shown.maxstring = 40


def _error(status: int, text: str, **extra) -> web.Response:
    return web.json_response({"error": text, **extra}, status=status)


def application(page) -> web.Application:
    # A login or a command is a few dozen bytes: anything much larger is refused before it is read.
    app = web.Application(middlewares=[_guarded(page)], client_max_size=16 * 1024)
    app["page"] = page
    get, post = app.router.add_get, app.router.add_post
    get("/", _index)
    get("/static/{name}", _static)
    get("/api/me", _me)
    post("/api/login", _login)
    post("/api/logout", _logout)
    get("/api/state", _state)
    get("/api/results", _results)
    get("/api/results/{id}", _result)
    get("/api/stats", _stats)
    post("/api/stats/reset", _reset)
    get("/api/live", _live)
    get("/api/live/{kind:frame\\.jpg|crop\\.png}", _live_picture)
    get("/api/crops/{id}.{ext:jpg|png}", _crop)
    post("/api/command", _command)
    get("/api/products", _products)
    return app


# -- who may do what

PUBLIC = {"/", "/api/me", "/api/login"}


def _guarded(page):
    @web.middleware
    async def guard(request: web.Request, handler):
        try:
            response = await _checked(page, request, handler)
        except web.HTTPException as exc:  # unknown route, wrong method: a sentence, as JSON
            response = _error(exc.status, exc.reason)
        except Exception:  # a bug in the page must never reach the client as a traceback, nor stop the station
            log.exception("web: %s %s failed", request.method, request.path)
            response = _error(500, "the page's server failed on this request; the station's log has the details")
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    return guard


async def _checked(page, request: web.Request, handler):
    if page.open and request.host.rsplit(":", 1)[0] not in (*LOOPBACK_HOSTS, page.config.bind):
        # The open page answers only to loopback names: a site rebinding its DNS to 127.0.0.1 gets nothing.
        return _error(421, "the open page answers on 127.0.0.1 or localhost only")
    request["session"] = session = None if page.open else page.sessions.get(request.cookies.get(COOKIE))
    public = request.path in PUBLIC or request.path.startswith("/static/")
    if not page.open and session is None and not public:
        return _error(401, "log in first", login=True)
    if request.method not in ("GET", "HEAD"):
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return _error(403, "a request from another site's page is refused")
    if request.method not in ("GET", "HEAD") and request.path != "/api/login":  # a login has no session yet
        expected = page.open_csrf if page.open else session.csrf
        if not csrf_matches(expected, request.headers.get("X-CSRF-Token")):
            return _error(403, "missing or wrong X-CSRF-Token (GET /api/me gives it)")
    return await handler(request)


def _who(request) -> tuple[str, str]:
    session = request["session"]
    return (OPEN_USER, "integrator") if session is None else (session.user, session.role)


def _may(request, role: str) -> bool:
    return role_may(_who(request)[1], role)


async def _body(request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise DataError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise DataError("the request body must be a JSON object")
    return body


# -- pages and sessions


async def _index(request):
    return web.Response(
        body=request.app["page"].static["index.html"], content_type="text/html", headers={"Cache-Control": "no-cache"}
    )


async def _static(request):
    name = request.match_info["name"]
    if name not in STATIC or name == "index.html":
        return _error(404, "no such file")
    return web.Response(
        body=request.app["page"].static[name], content_type=STATIC[name], headers={"Cache-Control": "no-cache"}
    )


async def _me(request):
    page = request.app["page"]
    if not page.open and request["session"] is None:
        return _error(401, "log in first", login=True, station=page.station)
    user, role = _who(request)
    csrf = page.open_csrf if page.open else request["session"].csrf
    return web.json_response({"user": user, "role": role, "open": page.open, "csrf": csrf, "station": page.station})


async def _login(request):
    page = request.app["page"]
    if page.open:
        return _error(400, "this page is open (loopback, no users): there is nothing to log in to")
    try:
        body = await _body(request)
    except DataError as exc:
        return _error(400, str(exc))
    name, password = body.get("name"), body.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or not name or len(password) > MAX_PASSWORD:
        return _error(400, "give name and password")
    peer = request.remote or "unknown"
    keys = (f"address {peer}", f"user {name[:64]}")
    wait = page.limit.wait(*keys)
    if wait > 0:
        log.warning("web: login as %s from %s refused: too many failed logins", _shown.repr(name), peer)
        return _error(429, f"too many failed logins: try again in {wait:.0f} s", retry_after=round(wait))
    user = page.users.get(name)
    right = await page.in_worker(check_password, user.hash if user else dummy_hash(), password)
    if user is None or not right:
        page.limit.failed(*keys)
        log.warning("web: failed login as %s from %s", _shown.repr(name), peer)
        return _error(401, "wrong name or password", login=True)
    page.limit.succeeded(*keys)
    token, session = page.sessions.open(user.name, user.role)
    log.info("web: %s (%s) logged in from %s", user.name, user.role, peer)
    response = web.json_response(
        {"user": user.name, "role": user.role, "open": False, "csrf": session.csrf, "station": page.station}
    )
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=page.ssl is not None, path="/")
    return response


async def _logout(request):
    page = request.app["page"]
    if not page.open:
        user, role = _who(request)
        page.sessions.close(request.cookies.get(COOKIE))
        log.info("web: %s (%s) logged out", user, role)
    response = web.json_response({"ok": True})
    response.del_cookie(COOKIE, path="/")
    return response


# -- what the station is doing


async def _state(request):
    state = request.app["page"].feed.state
    return web.json_response(state) if state is not None else _error(503, "the station is starting")


def summary(message: dict) -> dict:
    """A result as the filmstrip shows it."""
    keys = ("seq", "id", "ts", "source", "part_id", "product", "score", "threshold", "latency_ms")
    shown = {key: message.get(key) for key in keys}
    if "verdict" in message:
        shown.update(
            verdict=message["verdict"],
            thumbnail=f"/api/crops/{message['id']}.jpg",
            worst_position=message.get("worst_position"),
        )
    else:
        shown.update(verdict="no_verdict", reason=message.get("reason"))
    return shown


def _count(text: str | None, default: int, largest: int) -> int:
    try:
        return max(0, min(int(text), largest)) if text is not None else default
    except ValueError:
        raise DataError(f"n and after must be whole numbers, got {_shown.repr(text)}") from None


async def _results(request):
    page = request.app["page"]
    try:
        count = _count(request.query.get("n"), page.config.results, page.config.results)
        after = _count(request.query.get("after"), 0, 2**63) if "after" in request.query else None
    except DataError as exc:
        return _error(400, str(exc))
    ng_only = request.query.get("ng") in ("1", "true")
    return web.json_response(
        {"results": [summary(m) for m in page.feed.results(count, ng_only, after)], "kept": page.config.results}
    )


async def _result(request):
    message = request.app["page"].feed.result(request.match_info["id"])
    return web.json_response(message) if message is not None else _error(404, "not among the results kept")


async def _stats(request):
    page = request.app["page"]
    figures = await page.in_worker(page.daemon_figures)  # the outbox's depth is a read of its database
    start, since_reset = page.feed.tallies()
    start["dropped_frames"] = figures["dropped_frames"]
    since_reset["dropped_frames"] = figures["dropped_frames"] - page.feed.dropped_at_reset
    state = page.feed.state or {}
    return web.json_response(
        {
            "station": page.station,
            "started": page.started_wall,
            "since_start": start,
            "since_reset": since_reset,
            "outbox_depth": figures["outbox_depth"],
            "broker": figures["broker"],
            "camera": figures["camera"],
            "paused": state.get("paused"),
            "problems": state.get("problems", []),
            "uptime_s": figures["uptime_s"],
        }
    )


async def _reset(request):
    page = request.app["page"]
    if not _may(request, "operator"):
        return _refused(request, "reset the statistics")
    figures = await page.in_worker(page.daemon_figures)
    page.feed.reset(figures["dropped_frames"])
    user, role = _who(request)
    log.info("web: %s (%s) reset the statistics", user, role)
    return web.json_response({"ok": True})


def _refused(request, what: str) -> web.Response:
    user, role = _who(request)
    log.warning("web: %s (%s) may not %s: refused", user, role, what)
    return _error(403, f"{role} {user} may not {what}: an operator or integrator may")


async def _live(request):
    page = request.app["page"]
    if page.feed.latest is None:
        return web.json_response({"number": None})
    latest = (await page.in_worker(page.pictures.current, page.feed.latest))[0]  # the part the pictures show
    image = latest.frame.image
    return web.json_response(
        {
            "number": latest.number,
            "verdict": summary(latest.message),
            "frame": {"width": int(image.shape[1]), "height": int(image.shape[0])},
            "regions": [r.name for r in latest.inspector.regions],
        }
    )


async def _live_picture(request):
    page = request.app["page"]
    latest = page.feed.latest
    if latest is None:
        return _error(404, "no part judged yet")
    kind = request.match_info["kind"]
    asked = request.query.get("n", "")  # the part /api/live named: its own picture, not a newer part's
    number = int(asked) if asked.isascii() and asked.isdigit() and len(asked) < 19 else None
    data = await page.in_worker(page.pictures.picture, kind.split(".")[0], number, latest)
    return web.Response(body=data, content_type="image/jpeg" if kind.endswith("jpg") else "image/png")


async def _crop(request):
    page = request.app["page"]
    found = await page.in_worker(page.thumbnails.get, request.match_info["id"], request.match_info["ext"] == "png")
    if found is None:
        return _error(404, "no crop kept for this part (keep_crops: in station.yaml)")
    data, content_type = found
    # A kept crop never changes under its verdict id: the browser may keep it.
    return web.Response(body=data, content_type=content_type, headers={"Cache-Control": "private, max-age=3600"})


# -- operations: the MQTT commands' own path


async def _command(request):
    page = request.app["page"]
    try:
        body = await _body(request)
    except DataError as exc:
        return _error(400, str(exc))
    cmd = body.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:  # a list or object would not even hash
        return _error(400, f"cmd must be one of {', '.join(COMMANDS)}")
    if not _may(request, COMMANDS[cmd]):
        return _refused(request, cmd)
    product = body.get("product")
    if cmd == "product" and not isinstance(product, str):
        return _error(400, "cmd product needs a product (GET /api/products lists them)")
    user, role = _who(request)
    page.commands += 1
    command_id = f"web-{page.commands}"
    command = {"id": command_id, "cmd": cmd, **({"product": product} if cmd == "product" else {})}
    loop = asyncio.get_running_loop()
    answered = loop.create_future()

    def reply(answer: dict):  # from the judging loop's thread, or at once when the inbox refuses
        loop.call_soon_threadsafe(lambda: answered.done() or answered.set_result(answer))

    what = f"{cmd} {_shown.repr(product)}" if cmd == "product" else cmd
    log.info("web: %s (%s) asks %s (%s)", user, role, what, command_id)
    page.daemon.inbox.offer(json.dumps(command).encode(), reply)  # parsed and checked there, as MQTT's are
    try:
        answer = await asyncio.wait_for(answered, COMMAND_TIMEOUT)
    except asyncio.TimeoutError:
        log.warning("web: %s (%s) %s (%s): no answer within %g s", user, role, what, command_id, COMMAND_TIMEOUT)
        return web.json_response(
            {"id": command_id, "ok": False, "error": f"no answer from the station within {COMMAND_TIMEOUT:g} s"},
            status=504,
        )
    log.info(
        "web: %s (%s) %s (%s): %s",
        user,
        role,
        what,
        command_id,
        "done" if answer["ok"] else f"refused: {answer['error']}",
    )
    return web.json_response(answer)


async def _products(request):
    config = request.app["page"].daemon.config  # swapped whole by a reload: one read
    state = request.app["page"].feed.state or {}
    return web.json_response({"products": sorted(config.products or ()), "current": state.get("product")})
