"""Who is on the page: sessions, CSRF tokens and the login's rate limit.

A session is a random token in a cookie (HttpOnly: no script reads it; SameSite=Strict: no other site's
page sends it; Secure over HTTPS). Every state-changing request must also carry the session's CSRF
token in the X-CSRF-Token header, which only the page's own script can read (from /api/me) and send:
another site can neither read it nor set that header without a CORS grant the page never gives. The
open page (loopback, no users) has one such token for the process.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

SESSION_IDLE = 8 * 3600.0  # seconds a session lives without a request: one shift
MAX_SESSIONS = 1000  # the oldest is forgotten beyond this: a login flood cannot grow memory
LOGIN_FAILURES = 5  # failed logins per client address or user name within LOGIN_WINDOW
LOGIN_WINDOW = 60.0
MAX_TRACKED = 10_000  # addresses and names whose failures are remembered


@dataclass
class Session:
    user: str
    role: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    seen: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, user: str, role: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(user, role, seen=self._clock())
        self._sessions[token] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return token, session

    def get(self, token: str | None) -> Session | None:
        session = self._sessions.get(token) if token else None
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > SESSION_IDLE:
            del self._sessions[token]
            return None
        session.seen = now
        self._sessions.move_to_end(token)
        return session

    def close(self, token: str | None):
        self._sessions.pop(token, None)


def csrf_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


class LoginLimit:
    """At most LOGIN_FAILURES failed logins per address and per user name in LOGIN_WINDOW seconds: password
    guessing is slowed to a few tries a minute, and a flood of logins costs no scrypt beyond that."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._failures: OrderedDict[str, deque] = OrderedDict()

    def wait(self, *keys: str) -> float:
        """Seconds until these keys may try again (0 when they may now)."""
        now = self._clock()
        longest = 0.0
        for key in keys:
            times = self._failures.get(key)
            while times and now - times[0] > LOGIN_WINDOW:
                times.popleft()
            if times and len(times) >= LOGIN_FAILURES:
                longest = max(longest, LOGIN_WINDOW - (now - times[0]))
        return longest

    def failed(self, *keys: str):
        now = self._clock()
        for key in keys:
            self._failures.setdefault(key, deque(maxlen=LOGIN_FAILURES)).append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > MAX_TRACKED:
            self._failures.popitem(last=False)

    def succeeded(self, *keys: str):
        for key in keys:
            self._failures.pop(key, None)
