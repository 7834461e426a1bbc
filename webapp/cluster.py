"""The engine on more than one core or machine: a Ray Serve deployment, with a thin front.

One process serves every visitor by default (sessions.WorkspacePool). With MELO_ENGINE=ray
(or app.py --ray-address) the page and the API hold no model: they are a front whose pool,
`RayPool`, sends each call (melo_engine/service.py) to the `Engine` deployment with the
visitor's token as Ray Serve's multiplexed model id. Every replica loads the model and the
sentence encoder once; a workspace is a "model" in Serve's sense: `@serve.multiplexed`
opens it on the replica a visitor first reaches, keeps it in that replica's LRU
(`max_workspaces_per_replica`), and Serve routes the visitor's later calls to the replica
that holds it.

One writer per workspace. The workspaces live in one folder that every node mounts. A
replica that opens a workspace takes its lock (melo_engine/lock.py, flock) and keeps it while
the workspace is in its LRU; evicting it closes it, which lets the lock go. A call that
reaches a replica while another holds the workspace (after a failover, or when Serve routes
elsewhere) waits for the lock a bounded time ($MELO_LOCK_WAIT_SECONDS) and is then refused in
one line; it never writes beside the holder. The kernel drops a dead replica's locks, and the
next replica that opens the workspace replays its journal: every committed edit is there.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from melo_engine.service import READS, TRAINING, Pending, RemoteEditor, ServedWorkspace

from . import pinning
from .models import ModelShelf
from .sessions import WorkspacePool

APP = "melo"


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How the engine is deployed: `replicas` processes, each with `cpus_per_replica` of
    Ray's CPUs and `threads` torch threads, holding at most `max_workspaces_per_replica`
    workspaces open (least recently used closed first); `max_ongoing_requests` per replica is
    set high so that Serve never routes a visitor away from the replica holding the
    workspace because it is busy. With `pin_cores`, a replica that reserved whole CPUs binds
    itself to as many cores of its machine that no other replica holds (pinning.py)."""

    replicas: int = 2
    cpus_per_replica: float = 1.0
    threads: int = 1
    max_workspaces_per_replica: int = 64
    max_ongoing_requests: int = 64
    pin_cores: bool = True

    def __post_init__(self):
        for name in ("replicas", "threads", "max_workspaces_per_replica", "max_ongoing_requests"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {v!r}")
        if not isinstance(self.cpus_per_replica, (int, float)) or not self.cpus_per_replica > 0:
            raise ValueError(f"cpus_per_replica must be positive, not {self.cpus_per_replica!r}")
        if not isinstance(self.pin_cores, bool):
            raise ValueError(f"pin_cores must be true or false, not {self.pin_cores!r}")

    @classmethod
    def from_env(cls) -> "ClusterConfig":
        """MELO_REPLICAS, MELO_CPUS_PER_REPLICA, MELO_THREADS, MELO_WORKSPACES_PER_REPLICA,
        MELO_PIN_CORES (1 or 0)."""
        env = os.environ
        try:
            pin = env.get("MELO_PIN_CORES", "1")
            if pin not in ("0", "1"):
                raise ValueError(f"MELO_PIN_CORES must be 1 or 0, not {pin!r}")
            return cls(replicas=int(env.get("MELO_REPLICAS", 2)),
                       cpus_per_replica=float(env.get("MELO_CPUS_PER_REPLICA", 1)),
                       threads=int(env.get("MELO_THREADS", 1)),
                       max_workspaces_per_replica=int(env.get("MELO_WORKSPACES_PER_REPLICA", 64)),
                       pin_cores=pin == "1")
        except ValueError as err:
            raise ValueError(f"engine settings: {err}") from None


class Engine:
    """One replica: the model loaded once, visitors' workspaces opened on demand."""

    def __init__(self, root: str, model: str, threads: int, max_workspaces: int, cpus: float = 1.0,
                 max_ongoing: int = 64, pin_cores: bool = True):
        import torch
        from ray import serve

        from melo_engine.backbone import Backbone
        from melo_engine.keys import warm

        # Before the model loads: every thread started from here on inherits the binding.
        self.cores = pinning.claim(int(cpus)) if pin_cores and float(cpus).is_integer() else pinning.Cores([], [])
        torch.set_num_threads(threads)
        backbone = Backbone.load(model)
        warm(backbone)
        # Evictions close workspaces, so the pool never reaches its own cap. One model: the
        # one the front offers (RayPool.models).
        # One edit trains at a time here, beside as many generations as the replica has CPUs
        # (a Ray CPU is a reservation, not a limit, and more generations at once on one core
        # only make each slower), each a shared batch of the visitors' questions
        # (melo_engine/batching.py): enough answering calls at once to fill them.
        slots = max(1, round(cpus))
        self.pool = WorkspacePool(backbone, Path(root), max_open=max_workspaces + 8, models=ModelShelf(backbone),
                                  answer_slots=slots)
        self.training = threading.Lock()
        self.answering = threading.Semaphore(self.pool.answer_concurrency)
        # A thread for every request the replica accepts: one waiting for its turn to answer
        # never holds up a listing or a commit.
        self.threads = ThreadPoolExecutor(max_workers=max_ongoing, thread_name_prefix="melo-call")
        self._blank_ready()

        async def open_workspace(token: str) -> ServedWorkspace:
            self.pool.tokens.folder(token)       # a token this server issued, or one plain line
            return ServedWorkspace(self.pool, token, self.training, self.answering)
        self.workspace = serve.multiplexed(max_num_models_per_replica=max_workspaces)(open_workspace)

    def _blank_ready(self, tries: int = 60) -> None:
        """The shared empty workspace that answers first reads: made by whichever replica
        starts first (the others wait for it, under its lock)."""
        for _ in range(tries):
            try:
                self.pool.reader(self.pool.tokens.new())
                return
            except ValueError:
                time.sleep(1)
        self.pool.reader(self.pool.tokens.new())

    async def call(self, reach: str, op: str, args: tuple, kwargs: dict):
        from ray import serve

        served = await self.workspace(serve.get_multiplexed_model_id())
        return await asyncio.get_running_loop().run_in_executor(
            self.threads, functools.partial(served.call, reach, op, args, kwargs))

    async def pid(self) -> int:
        """This replica's process id (tests and the cluster benchmark: who holds a token)."""
        from ray import serve

        await self.workspace(serve.get_multiplexed_model_id())
        return os.getpid()

    async def claimed_cores(self) -> list[int]:
        """The cores this replica bound itself to (empty: none, it shares them all)."""
        return self.cores.cores


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the one started on this machine by
    `ray start --head`), or start a local one (`num_cpus`: Ray's CPUs, default all)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith(("MELO_", "HF_", "TRANSFORMERS_"))}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ANONYMIZED_TELEMETRY="False")
        kwargs = dict(address=address, runtime_env={"env_vars": env}, log_to_driver=False,
                      configure_logging=False)
        if address is None:
            kwargs.update(num_cpus=num_cpus, include_dashboard=False)
        ray.init(**kwargs)
    serve.start(proxy_location="Disabled")        # the front calls by handle: no HTTP proxy


def deploy(root: Path, model: str, cfg: ClusterConfig):
    """Run (or update) the engine application; returns its handle once every replica is up."""
    from ray import serve

    engine = serve.deployment(Engine).options(
        name="Engine", num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica})
    return serve.run(engine.bind(str(root), model, cfg.threads, cfg.max_workspaces_per_replica,
                                 cfg.cpus_per_replica, cfg.max_ongoing_requests, cfg.pin_cores),
                     name=APP, route_prefix=None)


class RayPool(WorkspacePool):
    """The front's pool: the same calls as WorkspacePool, answered by the deployment. It
    holds no model and no workspace open; it issues tokens and sweeps idle workspaces (one
    that a replica holds open is left alone: sessions.WorkspacePool._remove). Benchmarks
    run in the front's own lane (lane.py: a low-priority child process with its own model)."""

    def __init__(self, handle, root: Path | None = None, idle_seconds: float = 24 * 3600,
                 empty_idle_seconds: float = 600, train_concurrency: int = 2):
        super().__init__(None, root, idle_seconds, empty_idle_seconds)
        self.handle = handle
        self.train_concurrency = train_concurrency

    RETRIES = 3            # a read whose replica died goes again (Serve routes it to a live one)

    def _call(self, token: str, reach: str, op: str, args: tuple, kwargs: dict):
        from ray.exceptions import RayError, RayTaskError

        self.tokens.folder(token)                # refused here, before it travels
        started = time.time()
        for attempt in range(self.RETRIES + 1):
            try:
                return off_loop(lambda: self.handle.options(multiplexed_model_id=token).call.remote(
                    reach, op, args, kwargs).result())
            except RayTaskError as err:
                if isinstance(err.cause, ValueError):
                    raise ValueError(str(err.cause).strip().splitlines()[-1]) from None
                raise
            except RayError:
                if op in READS and attempt < self.RETRIES:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                if op == "commit":
                    raise ValueError(self._commit_fate(token, args[0], started)) from None
                if op in TRAINING:
                    raise ValueError("this edit was not applied: the engine serving your workspace stopped "
                                     "while it trained; apply it again") from None
                raise ValueError("the engine serving your workspace stopped; what you committed is kept: "
                                 "try again in a moment") from None

    def _commit_fate(self, token: str, pending: Pending, started: float) -> str:
        """What to say when the replica died during a commit: whether the edit is there."""
        try:
            done = any(e["prompt"] == pending.prompt and e["target"] == pending.target and e["created"] >= started - 1
                       for e in self._call(token, "read", "edits", (), {}))
        except ValueError:
            done = False
        return ("the engine stopped just after writing this edit: it is applied (see History)" if done else
                "this edit was not applied: the engine serving your workspace stopped; apply it again")

    def remote(self, token: str, reach: str) -> RemoteEditor:
        return RemoteEditor(lambda r, op, a, k: self._call(token, r, op, a, k), reach)

    def editor(self, token: str) -> RemoteEditor:
        self.tokens.folder(token)
        return self.remote(token, "open")

    def existing(self, token: str) -> RemoteEditor | None:
        # The replica decides again, under its pool's lock ("existing": a call answers None
        # where the workspace has gone since this look), and never makes one.
        folder = self.tokens.folder(token)
        return self.remote(token, "existing") if (self.root / folder / "ws").is_dir() else None

    def reader(self, token: str) -> RemoteEditor:
        self.tokens.folder(token)
        return self.remote(token, "read")

    @contextmanager
    def writing(self, token: str):
        self.tokens.folder(token)
        yield self.remote(token, "write")

    def close(self, token: str) -> None:
        pass                                     # the replicas hold the workspaces

    def set_model(self, token: str, name: str) -> RemoteEditor:
        """The engine runs one model (every replica loads it): only that one can be chosen."""
        self.tokens.folder(token)
        if name not in self.models:
            raise ValueError(f"this server's engine runs one model, {self.default_model!r}: "
                             f"it cannot open a workspace on {name!r}")
        return self.reader(token)

    def replica_of(self, token: str) -> int:
        """The process id of the replica that holds (or now opens) the token's workspace."""
        self.tokens.folder(token)
        return off_loop(lambda: self.handle.options(multiplexed_model_id=token).pid.remote().result())


def off_loop(call):
    """`call()`, which blocks on a Ray Serve handle. Ray refuses to block (and would route on)
    a thread whose event loop is running: an async caller's, or, in the test suite, the main
    thread's while Playwright's sync API holds its loop there. There it runs on a thread of
    its own; everywhere else (gradio's worker threads) where it is."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return call()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="melo-ray-call") as one:
        return one.submit(call).result()


def start(root: Path, model: str, cfg: ClusterConfig | None = None, address: str | None = None,
          idle_seconds: float = 24 * 3600) -> RayPool:
    """Connect to (or start) Ray, deploy the engine and return the front's pool."""
    cfg = cfg or ClusterConfig.from_env()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    connect(address)
    handle = deploy(root, model, cfg)
    return RayPool(handle, root, idle_seconds=idle_seconds, train_concurrency=cfg.replicas)


def stop() -> None:
    """Take the engine down and leave the Ray cluster (a local one ends with it)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
