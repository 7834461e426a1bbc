"""Requests a client can make by hand, answered in one line before gradio sees them.

gradio refuses a file named by a server path or by a URL in an event's data (only files
uploaded to it may be read), but only after its queue has taken the event, and it prints a
traceback each time. `UploadedFilesOnly` refuses such a call at the door instead.
"""
from __future__ import annotations

import json

MAX_BODY = 4 * 1024 * 1024        # an event's data: text, a workspace token, the probes' keys


def file_entries(value):
    """Every FileData (a dict whose meta says gradio.FileData) inside `value`."""
    if isinstance(value, dict):
        if isinstance(value.get("meta"), dict) and value["meta"].get("_type") == "gradio.FileData":
            yield value
        else:
            for v in value.values():
                yield from file_entries(v)
    elif isinstance(value, list):
        for v in value:
            yield from file_entries(v)


def uploaded(entry: dict, folder: str) -> bool:
    from gradio.utils import abspath, is_in_or_equal

    path = entry.get("path")
    return isinstance(path, str) and bool(path) and is_in_or_equal(abspath(path), abspath(folder))


async def _reply(send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class UploadedFilesOnly:
    """ASGI middleware: a JSON POST (a queue join, an API call) whose data names a file must
    name one uploaded to this server (gradio's upload folder); else a 400 in one line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers", [])) if scope["type"] == "http" else {}
        if scope.get("method") != "POST" or b"application/json" not in headers.get(b"content-type", b""):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return                          # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await _reply(send, 413, f"a request's data is limited to {MAX_BODY // 2**20} MB")
        from gradio.utils import get_upload_folder

        try:
            data = json.loads(body)
        except ValueError:
            data = None                         # gradio answers malformed JSON itself
        folder = get_upload_folder()
        if any(not uploaded(entry, folder) for entry in file_entries(data)):
            return await _reply(send, 400, "a file must first be uploaded to this server (POST /gradio_api/upload) "
                                           "and named by the path the upload returned")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
