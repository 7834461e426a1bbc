"""The API endpoints (gradio_client): plain JSON in and out, a workspace per client.

Each endpoint is a few lines over the same façade methods the page's callbacks call
(callbacks.py). The workspace is the one of the token cookie the client got with /config
(tokens.py), never one picked by the session hash, which any client can set. `register`
adds them to the page being built.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterator

import gradio as gr

from .callbacks import benchmark_choice, check_probe_count, probe_lines, user_errors
from .classifier import classifier_of
from . import render
from .lane import Progress
from .sessions import WorkspacePool
from .tokens import COOKIE

NAMES = ("/model", "/ask", "/classify", "/edit", "/correct", "/probe", "/delete", "/edits", "/benchmark")


def token_of(request: gr.Request) -> str:
    token = request.cookies.get(COOKIE)
    if not token:
        raise ValueError(f"no workspace: connect with gradio_client, which keeps the {COOKIE} cookie "
                         f"this server sets on /config (README, API)")
    return token


@user_errors
def ask(pool: WorkspacePool, question: str, request: gr.Request) -> dict:
    """Answer with the edited model; routing info: block, distance, radius, cluster."""
    return dataclasses.asdict(pool.reader(token_of(request)).ask(question, compare_base=True))


@user_errors
def model(pool: WorkspacePool, name: str, request: gr.Request) -> dict:
    """Make this client's workspace one of model `name` (a classifier, such as
    "minilm-wordnet", makes a classifier workspace), only while it has no edits; returns the
    model's name, prompt form and licence, and a classifier's labels. The server's models:
    the Settings tab of the page, or the one-line refusal of a name it does not offer."""
    if not isinstance(name, str):
        raise ValueError(f"the model must be text: one of {', '.join(pool.models)}")
    ed = pool.set_model(token_of(request), name.strip())
    labels = getattr(ed, "labels", None)
    return dict(ed.model_info(), **({"labels": labels} if labels is not None else {}))


@user_errors
def classify(pool: WorkspacePool, text: str, request: gr.Request) -> dict:
    """A classifier workspace: the label `text` gets, each label's probability, the block
    that fired (block, distance, radius) and the unedited classifier's label beside it."""
    return classifier_of(pool.reader(token_of(request))).classify(text, compare_base=True).to_json()


@user_errors
def edit(pool: WorkspacePool, question: str, target: str, request: gr.Request) -> Iterator[dict]:
    """Edit the model so `question` gets `target` (a classifier workspace: the text and its
    right label; an unknown label is refused with the list of labels); returns the edit result."""
    with pool.writing(token_of(request)) as ed:
        pending = ed.train(question, target)
        yield None              # not resumed if the client has gone (see callbacks.edit)
        yield dataclasses.asdict(ed.commit(pending))


@user_errors
def correct(pool: WorkspacePool, question: str, number: int, sentence: str, request: gr.Request,
            end: bool = False) -> Iterator[dict]:
    """Replace sentence `number` (1 for the first) of the answer `question` gets now by
    `sentence`; the sentences before it stay word for word; with `end` the answer stops
    after it. Returns the edit result."""
    with pool.writing(token_of(request)) as ed:
        pending = ed.train_correction(question, number, sentence, end=end)
        yield None              # not resumed if the client has gone (see callbacks.edit)
        yield dataclasses.asdict(ed.commit(pending))


@user_errors
def probe(pool: WorkspacePool, queries: str, request: gr.Request) -> list:
    """One query per line: each answered by the edited and the unedited model (a classifier
    workspace: each text's label with the edits and without)."""
    if not isinstance(queries, str):
        raise ValueError("the queries must be text, one per line")
    qs = [q for _, q in probe_lines(queries, "query")]
    check_probe_count(len(qs))
    ed = pool.reader(token_of(request))
    if render.words_for(ed) is render.TEXTS:             # a classifier workspace: labels
        return [c.to_json() for c in ed.classify_many(qs)]
    return [dataclasses.asdict(a) for a in ed.probe(qs)]


@user_errors
def delete(pool: WorkspacePool, edit_id: str, request: gr.Request) -> dict:
    """Undo one edit by id."""
    if not isinstance(edit_id, str):
        raise ValueError("the edit id must be text")
    token = token_of(request)
    pool.reader(token).record(edit_id.strip())      # an unknown id makes no workspace
    pool.editor(token).delete(edit_id.strip())
    return {"deleted": edit_id.strip()}


@user_errors
def edits(pool: WorkspacePool, request: gr.Request) -> list:
    """Every edit of this client's workspace (listing never creates one)."""
    ed = pool.existing(token_of(request))
    if ed is None:
        return []
    return ed.edits() or []     # an engine replica answers None where it went since the front looked


@user_errors
def benchmark(pool: WorkspacePool, n: int, methods: str, request: gr.Request) -> Iterator[dict]:
    """A small zsRE run of `n` edits per method (`methods`: comma-separated names) on this
    client's workspace's model, in the benchmark lane: its own low-priority process, one run per client at a time, never
    ahead of anyone's edit (lane.py). Returns the JSON of `python -m melo_engine.bench edits`."""
    token = token_of(request)
    pool.tokens.folder(token)
    if not isinstance(methods, str):
        raise ValueError("the methods must be text: names separated by commas")
    n, chosen = benchmark_choice(n, [m.strip() for m in methods.split(",")])
    pool.benchmarks.claim(token)
    pool.benchmarks.take(token)
    try:
        for step in pool.benchmarks.run(token, n, chosen, pool.benchmark_model(token)):
            yield None if isinstance(step, Progress) else step      # a gone client stops it here
    finally:
        pool.benchmarks.release(token)


def bind(fn, pool: WorkspacePool):
    """`fn` with the pool given, described to gradio (which reads the signature and the type
    hints to document the endpoint and to pass the request) without it."""
    if inspect.isgeneratorfunction(fn):
        def call(*args, **kwargs):
            yield from fn(pool, *args, **kwargs)
    else:
        def call(*args, **kwargs):
            return fn(pool, *args, **kwargs)
    functools.update_wrapper(call, fn)
    sig = inspect.signature(fn)
    call.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return call


def register(pool: WorkspacePool, answer_queue: dict, train_queue: dict | None = None) -> None:
    """Add the endpoints to the Blocks being built: asks and probes share the page's answer
    queue, edits, corrections and model changes (a first use loads the model) its training
    queue, benchmarks its benchmark lane."""
    train_queue = train_queue or {"concurrency_limit": 1, "concurrency_id": "train"}
    # A benchmark is claimed at once (a second of the same client refused, not queued behind
    # its first) and then waits for the lane itself (lane.py), beside the page's runs.
    bench_queue = {"concurrency_limit": None}
    for fn, queue in [(model, train_queue), (ask, answer_queue), (classify, answer_queue), (edit, train_queue),
                      (correct, train_queue), (probe, answer_queue), (delete, {}), (edits, {}),
                      (benchmark, bench_queue)]:
        gr.api(bind(fn, pool), api_name=fn.__name__, **queue)
