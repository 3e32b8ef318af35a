"""The page's users: one per line, `NAME:ROLE:HASH`, written by `station web-user NAME ROLE`.

    alice:operator:scrypt$16384$8$1$<salt, base64>$<hash, base64>

Only hashes are stored (hashlib.scrypt: memory-hard, so a stolen file is slow to attack); `#` starts a
comment. Roles grow: a viewer sees, an operator also pauses, resumes, reloads, changes over and resets the statistics,
an integrator also edits (later slices). A file a person damaged is refused at start with its line.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from station.core.errors import ConfigError
from station.core.user_files import read_text

ROLES = ("viewer", "operator", "integrator")  # each may do what the ones before it may
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# scrypt's cost: 16 MiB and ~0.05-0.1 s per check on a line PC; logins are rate-limited (auth.py).
N, R, P = 1 << 14, 8, 1
MAX_PASSWORD = 1024


@dataclass(frozen=True)
class User:
    name: str
    role: str
    hash: str

    def may(self, role: str) -> bool:
        return role_may(self.role, role)


def role_may(role: str, needed: str) -> bool:
    """May a user of `role` do what `needed` may?"""
    return ROLES.index(role) >= ROLES.index(needed)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=32)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, N, R, P)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return f"scrypt${N}${R}${P}${b64(salt)}${b64(digest)}"


def check_password(stored: str, password: str) -> bool:
    """Constant time against the stored hash; a malformed hash never matches."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt" or len(password) > MAX_PASSWORD:
            return False
        found = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
        return hmac.compare_digest(found, base64.b64decode(digest, validate=True))
    except (ValueError, TypeError, MemoryError):
        return False


@functools.cache
def dummy_hash() -> str:
    """Checked for unknown names, so their answer takes as long as a known one's (made once, when first needed)."""
    return hash_password(secrets.token_urlsafe(16))


def user_line(name: str, role: str, password: str) -> str:
    """The users-file line for a new user (ConfigError for a name, role or password the file cannot hold)."""
    if not NAME.match(name):
        raise ConfigError(f"user name {name!r}: 1 to 64 letters, digits or _ . @ -")
    if role not in ROLES:
        raise ConfigError(f"role {role!r}: one of {', '.join(ROLES)}")
    if not 8 <= len(password) <= MAX_PASSWORD:
        raise ConfigError(f"the password must have 8 to {MAX_PASSWORD} characters")
    return f"{name}:{role}:{hash_password(password)}"


def parse_users(text: str, where: str) -> dict[str, User]:
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        role, _, stored = rest.partition(":")
        if not NAME.match(name) or role not in ROLES or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise ConfigError(
                f"{where}:{number}: not a user line NAME:ROLE:HASH (ROLE one of {', '.join(ROLES)}); "
                "write it with `station web-user NAME ROLE`"
            )
        if name in users:
            raise ConfigError(f"{where}:{number}: user {name!r} is given twice")
        users[name] = User(name, role, stored)
    if not users:
        raise ConfigError(f"{where}: no users; add one with `station web-user NAME ROLE --file {where}`")
    return users


def load_users(config, env: dict[str, str] | None = None) -> dict[str, User] | None:
    """web.users_file's or web.users_credential's users; None when neither is given (the open page)."""
    env = os.environ if env is None else env
    if config.users_file is not None:
        path, key = Path(config.users_file), "web.users_file"
    elif config.users_credential is not None:
        folder, key = env.get("CREDENTIALS_DIRECTORY"), "web.users_credential"
        if not folder:
            raise ConfigError(
                f"{key} {config.users_credential!r}: $CREDENTIALS_DIRECTORY is not set; give the "
                f"service LoadCredential={config.users_credential}:/etc/station/web-users"
            )
        path = Path(folder) / config.users_credential
    else:
        return None
    try:
        return parse_users(read_text(path, ConfigError, "web users file"), str(path))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def add_user(path: Path, line: str):
    """Put a user's line in the file (replacing the user's old one), written whole and readable by its owner only."""
    path = Path(path)
    name = line.split(":", 1)[0]
    old = read_text(path, ConfigError, "web users file").splitlines() if path.exists() else []
    kept = [entry for entry in old if entry.strip().split(":", 1)[0] != name]
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:  # mkstemp's mode is 0600
            out.write("\n".join([*kept, line]) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write the users file ({exc.strerror or exc})") from None
