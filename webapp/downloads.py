"""Exported files, handed only to the visitor who asked for them.

gradio serves a returned file at a URL anyone holding it can fetch, for as long as its
cache lives. An export is a copy of someone's edits, so instead it waits in a private
folder under a one-time ticket: 32 random bytes, sent only in the reply to the visitor who
exported, good for one download within `ttl_seconds`, after which the file is deleted.
The ticket is bound to the browser that asked: the fetch must carry the same workspace
cookie (tokens.COOKIE, set on the page and on /config) as the export request did, so a
link that leaks (a log, a shared screen, a proxy) is no use to anyone else, and a stranger
who tries it does not spend it.
"""
from __future__ import annotations

import hmac
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse

from .tokens import COOKIE

ROUTE = "/melo/download/{ticket}"


class Downloads:
    def __init__(self, ttl_seconds: float = 600):
        self.ttl_seconds = ttl_seconds
        self.folder = Path(tempfile.mkdtemp(prefix="melo-downloads-"))   # mode 0700
        self._offers: dict[str, tuple[Path, float, str]] = {}
        self._lock = threading.Lock()

    def new_file(self, name: str) -> Path:
        """A path in a folder of its own, for a file to be offered."""
        return Path(tempfile.mkdtemp(dir=self.folder)) / name

    def offer(self, path: Path, owner: str | None) -> str:
        """The ticket for one download of `path` (a file made with `new_file`) by whoever
        sends the cookie `owner` (the exporting request's; without one, nobody can fetch it)."""
        self.forget_expired()
        ticket = secrets.token_urlsafe(32)
        with self._lock:
            self._offers[ticket] = (Path(path), time.time() + self.ttl_seconds, owner or "")
        return ticket

    def take(self, ticket: str, cookie: str | None = None) -> Path | None:
        """The ticket's file, once, for its owner: the ticket is spent whether or not it had
        expired; a fetch without the owner's cookie leaves it as it was."""
        with self._lock:
            _, _, owner = self._offers.get(ticket, (None, 0.0, ""))
            if not owner or not hmac.compare_digest(owner.encode(), (cookie or "").encode()):
                return None
            path, expires, _ = self._offers.pop(ticket)
        if path is None or time.time() > expires:
            if path is not None:
                shutil.rmtree(path.parent, ignore_errors=True)
            return None
        return path

    def forget_expired(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            gone = [t for t, (_, expires, _) in self._offers.items() if now > expires]
            paths = [self._offers.pop(t)[0] for t in gone]
        for p in paths:
            shutil.rmtree(p.parent, ignore_errors=True)

    async def endpoint(self, request: Request):
        """GET ROUTE: the file as an attachment, deleted once sent; 404 for any other ticket."""
        path = self.take(request.path_params["ticket"], request.cookies.get(COOKIE))
        if path is None or not path.is_file():
            return PlainTextResponse("This download link has been used or has expired: export again.",
                                     status_code=404)
        return FileResponse(path, filename=path.name, media_type="application/octet-stream",
                            background=BackgroundTask(shutil.rmtree, path.parent, True))

    def close(self) -> None:
        """Delete every file still on offer (the server is stopping)."""
        shutil.rmtree(self.folder, ignore_errors=True)
