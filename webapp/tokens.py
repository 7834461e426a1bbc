"""Workspace tokens: the server hands them out, and only the server can.

A visitor's workspace is reached by a token, never by a value a client picks: a token is 32
random characters and an HMAC of them under a secret that lives beside the workspaces (so
tokens survive a restart). A client that invents, truncates or alters a token is refused;
one that guesses has 2^192 random values to try. The workspace's folder is a hash of the
token, so even a listing of the folder tree gives no usable token.

The page keeps its token in the browser's local storage; API clients get theirs as a cookie
(see `COOKIE`), which gradio_client sends back with every call.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from http.cookies import CookieError, SimpleCookie
from pathlib import Path

COOKIE = "melo_workspace"
_SHAPE = re.compile(r"[A-Za-z0-9_-]{32}\.[A-Za-z0-9_-]{22}")


class WorkspaceTokens:
    """Issue and check tokens signed with the secret in `root/.token-secret`."""

    def __init__(self, root: Path):
        self._secret = self._load_secret(Path(root) / ".token-secret")

    @staticmethod
    def _load_secret(path: Path) -> bytes:
        """The secret in `path`, made first if there is none. It is written whole to a file of
        its own and linked into place (link fails if the name exists), so of two servers
        starting at once one makes it and both read the same, never a half-written file."""
        if not path.exists():
            tmp = path.with_name(f".{path.name}-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass                       # the other server's secret stands
            finally:
                tmp.unlink()
        secret = path.read_bytes()
        if len(secret) < 32:
            raise ValueError(f"{path.name} in the workspaces folder is damaged: remove it "
                             f"(every visitor then starts a new workspace)")
        return secret

    def _sign(self, random_part: str) -> str:
        mac = hmac.new(self._secret, random_part.encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def new(self) -> str:
        random_part = secrets.token_urlsafe(24)
        return f"{random_part}.{self._sign(random_part)}"

    def valid(self, token) -> bool:
        if not isinstance(token, str) or not _SHAPE.fullmatch(token):
            return False
        random_part, mac = token.split(".")
        return hmac.compare_digest(mac, self._sign(random_part))

    def folder(self, token) -> str:
        """The folder name of the token's workspace; ValueError for a token this server did not issue."""
        if not self.valid(token):
            raise ValueError("this workspace token was not issued by this server: reload the page "
                             "(or, from the API, connect again) to get a new workspace")
        return hashlib.sha256(token.encode()).hexdigest()[:40]


class TokenCookie:
    """ASGI middleware: the reply to GET /config (which gradio_client fetches first, then
    sends the cookies it received with every call) and to GET / (the page, whose browser
    then sends it with its requests: downloads.py binds an export link to it) carries a new
    token as a cookie when the request brought no valid one. A client keeps its workspace across connections by
    sending that cookie again (README, "API")."""

    def __init__(self, app, tokens: WorkspaceTokens, max_age_days: int = 30):
        self.app = app
        self.tokens = tokens
        self.max_age = max_age_days * 24 * 3600

    def _has_valid_cookie(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                try:
                    jar = SimpleCookie(value.decode("latin-1"))
                except CookieError:
                    continue
                if COOKIE in jar and self.tokens.valid(jar[COOKIE].value):
                    return True
        return False

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope.get("method") != "GET" or not (path.endswith("/config") or path == "/")
                or self._has_valid_cookie(scope)):
            return await self.app(scope, receive, send)
        cookie = (f"{COOKIE}={self.tokens.new()}; Path=/; Max-Age={self.max_age}; HttpOnly; "
                  f"SameSite=Lax").encode()

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", cookie)])
            await send(message)

        await self.app(scope, receive, send_with_cookie)
