"""The page's HTTP server (aiohttp, the `web` extra), in a thread of its own with its own event loop.

aiohttp because it is one well-kept library that is both the server and the framework: an AppRunner
runs in any thread's event loop (no signal handlers taken from the daemon, no second process), TLS is
a plain ssl.SSLContext, and a slow client only ever waits on its own socket. The judging loop never
waits for this thread: it hands over references (feed.py) and commands go through its inbox, whose
answers are passed back with call_soon_threadsafe. Pictures and password checks run in one worker
thread, so the page costs the line PC at most one core's share, whatever the browsers ask.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from station.core.errors import ConfigError, MissingExtraError

try:
    from aiohttp import web
except ImportError:  # the daemon says which extra to install (exit 69)
    web = None

from station.runtime.web import api
from station.runtime.web.api import STATIC
from station.runtime.web.auth import LoginLimit, Sessions
from station.runtime.web.feed import WebFeed
from station.runtime.web.pictures import LivePictures, Thumbnails
from station.runtime.web.users import load_users

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0


class ClientFaults(logging.Filter):
    """What a client on the network causes (a malformed request, a connection dropped or a TLS
    handshake gone wrong) is one warning line in the station's log, never a traceback: aiohttp and
    asyncio log those with the whole stack, which told plant IT the station had crashed."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not is_client_fault(error):
            return True
        record.msg, record.args = "web: %s: %s", (record.getMessage(), _one_line(error))
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


def is_client_fault(error: BaseException) -> bool:
    from aiohttp.http_exceptions import HttpProcessingError

    return isinstance(error, (HttpProcessingError, ssl.SSLError, ConnectionError, TimeoutError))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict):
    """The web loop's handler: a client's fault is one line; anything else keeps asyncio's report."""
    error = context.get("exception")
    if error is not None and is_client_fault(error):
        log.warning("web: a connection ended badly: %s", _one_line(error))
        return
    loop.default_exception_handler(context)


class WebPage:
    """Started by Integrations (station/runtime/integrations/wiring.py) when station.yaml has `web:`."""

    def __init__(self, config, daemon, state_dir: Path):
        if web is None:
            raise MissingExtraError(
                "web: the station's page needs the web extra: pip install 'inspection-station[web]' (aiohttp)"
            )
        self.config = config
        self.daemon = daemon
        self.station = daemon.config.station
        self.started_wall = daemon.stats.started_wall
        self.users = load_users(config)  # None: the open page on loopback (config/web.py refuses it elsewhere)
        self.feed = WebFeed(config.results)
        self.sessions, self.limit = Sessions(), LoginLimit()
        self.pictures, self.thumbnails = LivePictures(), Thumbnails(Path(state_dir) / "crops")
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web-worker")
        self.static = {name: (resources.files("station.runtime.web") / "static" / name).read_bytes() for name in STATIC}
        self.ssl = self._ssl_context()
        self.commands = 0
        self.open_csrf = secrets.token_urlsafe(32)  # the open page's one CSRF token (auth.py)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._thread: threading.Thread | None = None

    @property
    def open(self) -> bool:
        return self.users is None

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.config.certificate, self.config.private_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"web.certificate / web.private_key: cannot be used for HTTPS ({exc})") from None
        return context

    # -- the daemon's side

    def start(self):
        """Listen, or ConfigError (exit 78) naming the key to change; returns once the port is bound."""
        started, failure = threading.Event(), []
        self._thread = threading.Thread(target=self._serve, args=(started, failure), name="web", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT):
            raise ConfigError(f"web: the page did not start within {START_TIMEOUT:g} s")
        if failure:
            raise failure[0]
        scheme = "https" if self.ssl else "http"
        log.info(
            "the station's page on %s://%s:%d/ (%s)",
            scheme,
            self.config.bind,
            self.config.port,
            "open: loopback, no users" if self.open else f"{len(self.users)} users",
        )

    def close(self, timeout: float = 3.0):
        loop = self._loop
        if loop is not None and self._thread is not None and self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._stop(), loop).result(timeout)
            except Exception:  # stopping must never hold up the daemon's shutdown
                log.warning("the page's server did not stop cleanly", exc_info=True)
            self._thread.join(timeout)
        self.worker.shutdown(wait=False, cancel_futures=True)

    # -- the web thread

    def _serve(self, started: threading.Event, failure: list):
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_loop_exception)
        for name in ("aiohttp.server", "aiohttp.web"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, ClientFaults) for f in logger.filters):
                logger.addFilter(ClientFaults())
        try:
            self._runner = web.AppRunner(
                api.application(self), access_log=None, handle_signals=False, shutdown_timeout=1.0
            )
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.config.bind, self.config.port, ssl_context=self.ssl)
            loop.run_until_complete(site.start())
        except OSError as exc:
            failure.append(
                ConfigError(
                    f"web: cannot serve the page on {self.config.bind}:{self.config.port} ({exc.strerror or exc}); "
                    "give each station its own web.port"
                )
            )
        except Exception as exc:  # noqa: BLE001 - reported to the daemon, which stops with it
            failure.append(ConfigError(f"web: the page cannot start: {exc}"))
        finally:
            started.set()
        if failure:
            loop.close()
            return
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _stop(self):
        if self._runner is not None:
            await self._runner.cleanup()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    async def in_worker(self, function, *args):
        """Run picture making or a password check in the page's one worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    # -- figures read at request time (as Prometheus reads them at scrape time): nothing per part

    def daemon_figures(self) -> dict:
        d = self.daemon
        capture = getattr(d, "feed", None) or getattr(d, "latest", None)
        source = getattr(d, "source", None)
        try:
            depth = d.outbox.depth()
        except Exception:  # the outbox is closing or its disk failed: the daemon reports that itself
            depth = None
        return {
            "dropped_frames": getattr(capture, "dropped", 0) + getattr(d, "_unjudged_frames", 0),
            "outbox_depth": depth,
            "broker": "connected" if d.publisher.connected else "disconnected",
            "camera": getattr(source, "state", "starting"),
            "uptime_s": round(time.monotonic() - d.stats.started, 3),
        }
