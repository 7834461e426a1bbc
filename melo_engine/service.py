"""The engine as a service: every operation a front (the page, the API) asks of a visitor's
workspace, named in one table, so that the engine can run in the front's own process or
elsewhere (a Ray Serve deployment, webapp/cluster.py) behind the same calls.

A front reaches a visitor's workspace through a pool (webapp/sessions.py) in one of four
ways, `REACHES`: to read (the visitor's workspace, or a shared empty read-only one: a read
creates nothing), to write (made on first write; a refused write removes what it made), to
open (made if missing) and `existing` (only if it exists). In one process the pool hands out
the MeloEditor itself: that is the in-process implementation, and the default. A front that
holds no model hands out a `RemoteEditor` instead: the same methods, each one sent as
(reach, operation, arguments) to wherever the engine runs, which answers it with a
`ServedWorkspace` over its own pool. Only the operations of `OPERATIONS` can be called that
way, and what crosses is plain data (records, dataclasses, bytes), never a path on the
front's disk nor a callable: an export comes back as bytes, an import or a file of probe
questions goes as bytes, and a training progress callback stays behind.

A trained edit not yet committed (MeloEditor.train) stays where it was trained: the front
holds a `Pending` ticket and commits by it, so an edit whose engine died between the two is
reported as not applied, never applied half.
"""
from __future__ import annotations

import dataclasses
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

REACHES = ("read", "write", "open", "existing")


class Workspaces(Protocol):
    """The interface a front calls, one method per reach. Two implementations:
    webapp/sessions.WorkspacePool (in-process: hands out MeloEditors) and
    webapp/cluster.RayPool (hands out RemoteEditors over the Ray Serve deployment)."""

    def reader(self, token: str) -> Any: ...
    def writing(self, token: str) -> ContextManager[Any]: ...
    def editor(self, token: str) -> Any: ...
    def existing(self, token: str) -> Any | None: ...
    def close(self, token: str) -> None: ...

# MeloEditor methods a front may call remotely, as they are.
PLAIN = frozenset({
    "ask", "probe", "answered_by", "route", "edits", "record", "side_effects", "index_snapshot", "distances",
    "stats", "default_settings", "update_settings", "set_key_source", "set_prompt_mode", "sentence_prefix",
    "delete", "reset",
})
# Operations that cross differently: a trained edit stays behind, files go as bytes.
SPECIAL = frozenset({"config", "train", "train_correction", "commit", "export", "import_report",
                     "probe_bank_add", "probe_bank_count"})
OPERATIONS = PLAIN | SPECIAL
# The ones that change nothing: safe to send again when the engine that had them died.
READS = frozenset({"ask", "probe", "answered_by", "route", "edits", "record", "side_effects", "index_snapshot",
                   "distances", "stats", "default_settings", "sentence_prefix", "config", "export",
                   "probe_bank_count"})
# The ones that train a block: one at a time per engine process (a replica; the one-process
# app trains as many at once as it has training workers); and the ones that generate text:
# as many at a time as the process has cores (as the one-process app queues them).
TRAINING = frozenset({"train", "train_correction"})
GENERATING = frozenset({"ask", "probe", "sentence_prefix"})


@dataclasses.dataclass(frozen=True)
class Pending:
    """A trained edit left where it was trained, to commit by this ticket."""

    ticket: str
    prompt: str
    target: str


class ServedWorkspace:
    """The engine's side of one visitor's workspace: answers calls by the table over `pool`
    (webapp/sessions.WorkspacePool) and keeps the edits trained but not yet committed.
    `training` and `answering` are the engine process's, shared by all its workspaces.
    `close` lets go of the workspace and its lock (the pool's `close`) once the calls in
    progress are done; Ray Serve calls it (as `__del__`) when it evicts the workspace."""

    MAX_PENDING = 4         # trained edits kept for a commit that may never come (client gone)

    def __init__(self, pool, token: str, training: threading.Lock | None = None,
                 answering: threading.Semaphore | None = None):
        self.pool, self.token = pool, token
        self.training = training or threading.Lock()
        self.answering = answering or threading.Semaphore(1)
        self.pending: dict[str, Any] = {}
        self._busy = 0
        self._idle = threading.Condition()
        self._closed = False

    def call(self, reach: str, op: str, args: tuple = (), kwargs: dict | None = None):
        with self._idle:
            if self._closed:
                raise ValueError("your workspace was just closed here; try again")
            self._busy += 1
        try:
            return self._dispatch(reach, op, args, kwargs)
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _dispatch(self, reach: str, op: str, args: tuple, kwargs: dict | None):
        if reach not in REACHES:
            raise ValueError(f"unknown way to reach a workspace: {reach!r}")
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}")
        kwargs = dict(kwargs or {})
        if op == "probe_bank_add" and reach != "write":
            # a read reaches the shared empty workspace of a visitor without one: its own
            # list would be every such visitor's
            raise ValueError("questions are added by a write")
        if reach == "write":
            with self.pool.writing(self.token) as ed:
                return self._run(ed, op, args, kwargs)
        ed = {"read": self.pool.reader, "open": self.pool.editor, "existing": self.pool.existing}[reach](self.token)
        return None if ed is None else self._run(ed, op, args, kwargs)

    def _run(self, ed, op: str, args: tuple, kwargs: dict):
        if op in GENERATING:
            with self.answering:
                return getattr(ed, op)(*args, **kwargs)
        if op in PLAIN:
            return getattr(ed, op)(*args, **kwargs)
        if op == "config":
            return ed.config
        if op in TRAINING:
            with self.training:
                trained = getattr(ed, op)(*args, **kwargs)
            ticket = uuid.uuid4().hex
            self.pending[ticket] = trained
            while len(self.pending) > self.MAX_PENDING:
                self.pending.pop(next(iter(self.pending)))
            return Pending(ticket, trained.prompt, trained.target)
        if op == "commit":
            trained = self.pending.pop(args[0].ticket, None)
            if trained is None:
                raise ValueError("this edit was not applied: the engine that trained it has restarted since; "
                                 "apply it again")
            return ed.commit(trained)
        with tempfile.TemporaryDirectory(prefix="melo-served-") as tmp:
            if op == "export":
                return ed.export(Path(tmp) / "edits.melo").read_bytes()
            if op == "import_report":
                data, name = args
                path = Path(tmp) / Path(name).name
                path.write_bytes(data)
                return ed.import_report(path)
            if op == "probe_bank_add":
                data, name, source = args
                path = Path(tmp) / Path(name).name
                path.write_bytes(data)
                return ed.probe_bank().add_file(path, source=source)
            return ed.probe_bank().count()          # probe_bank_count

    def close(self, wait_seconds: float = 600) -> None:
        with self._idle:
            if self._closed:
                return
            self._closed = True
            self._idle.wait_for(lambda: self._busy == 0, timeout=wait_seconds)
        self.pending.clear()
        self.pool.close(self.token)

    __del__ = close


Call = Callable[[str, str, tuple, dict], Any]        # (reach, op, args, kwargs) -> result


class RemoteEditor:
    """What a front without the model holds for a visitor's workspace: MeloEditor's methods
    that the page and the API use, each one a `call` to the engine (see the module)."""

    def __init__(self, call: Call, reach: str):
        self._call, self._reach = call, reach

    def __getattr__(self, op: str):
        if op not in PLAIN:
            raise AttributeError(op)

        def remote(*args, **kwargs):
            return self._call(self._reach, op, args, kwargs)
        return remote

    @property
    def config(self):
        return self._call(self._reach, "config", (), {})

    def train(self, prompt, target, progress=None, prefix=None, end=False) -> Pending:
        return self._call(self._reach, "train", (prompt, target), {"prefix": prefix, "end": end})

    def train_correction(self, question, number, sentence, answer=None, progress=None, end=False) -> Pending:
        return self._call(self._reach, "train_correction", (question, number, sentence, answer), {"end": end})

    def commit(self, pending: Pending):
        return self._call(self._reach, "commit", (pending,), {})

    def edit(self, prompt, target, progress=None, prefix=None, end=False):
        return self.commit(self.train(prompt, target, prefix=prefix, end=end))

    def export(self, path) -> Path:
        path = Path(path)
        path.write_bytes(self._call(self._reach, "export", (), {}))
        return path

    def import_report(self, path):
        path = Path(path)
        return self._call(self._reach, "import_report", (path.read_bytes(), path.name), {})

    def import_(self, path) -> list[str]:
        return self.import_report(path).added

    def probe_bank(self) -> "RemoteProbeBank":
        return RemoteProbeBank(self._call, self._reach)


class RemoteProbeBank:
    """The probe bank's calls the page makes (add a file, count), sent to the engine."""

    def __init__(self, call: Call, reach: str):
        self._call, self._reach = call, reach

    def add_file(self, path, source: str | None = None, progress=None) -> tuple[int, int]:
        path = Path(path)
        return self._call(self._reach, "probe_bank_add", (path.read_bytes(), path.name, source or path.name), {})

    def count(self) -> int:
        return self._call(self._reach, "probe_bank_count", (), {})
