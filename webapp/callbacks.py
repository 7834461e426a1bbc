"""Callbacks: plain functions that call the engine and return what the page shows (render.py
makes the HTML, plots.py the figures).

Each takes the WorkspacePool and the visitor's token first (layout.py binds them). Engine
errors are ValueErrors with a message meant for the user; `user_errors` turns them into a
short gr.Error instead of a traceback.
"""
from __future__ import annotations

import functools
import html
import inspect
import time

import gradio as gr

from melo_engine.registry import KEY_SOURCES, METHODS
from melo_engine.trainproc import TrainingStopped

from . import plots, published, questionlists, render
from .downloads import ROUTE, Downloads
from .lane import Progress
from .sessions import WorkspacePool
from .tokens import COOKIE

MAX_PROBES = 20


# What a visitor is told in one line: bad input, an unknown id, a bad file (ValueError), an
# edit whose training process stopped under it (nothing was applied).
SAID_TO_USER = (ValueError, TrainingStopped)


def user_errors(fn):
    """Show a SAID_TO_USER error as a short message, not a traceback."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except SAID_TO_USER as err:
                raise gr.Error(str(err), print_exception=False) from None
        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SAID_TO_USER as err:
            raise gr.Error(str(err), print_exception=False) from None
    return wrapper


def notices(fn):
    """For a page action that only shows or removes something (ask, probe, the side-effect
    check, delete, export): a refusal is a notice and every panel keeps what it showed. As
    an error, gradio marks the event's panels "Error", and that label stayed after the
    message had faded, beside a question typed since (a walkthrough saw it). Actions whose
    refusal must stop what follows them (a benchmark's claim, reset) raise (user_errors)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except SAID_TO_USER as err:
                gr.Warning(str(err))
                yield gr.skip()
        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SAID_TO_USER as err:
            gr.Warning(str(err))
            return gr.skip()
    return wrapper


def visitor_token(pool: WorkspacePool, token: str | None) -> str:
    """The browser's workspace token, or a new one on a first visit (or for one this server did
    not issue: an older token, or one somebody typed in)."""
    return token if pool.tokens.valid(token) else pool.tokens.new()


# ---- actions -------------------------------------------------------------------------
def shown_answer(question: str, ans):
    """The Edit tab's left panel for an answer: (the answer, numbered by sentence; what was
    answered, for a sentence correction; the "what to correct" choices, back to the whole
    answer; the "end the answer there" box, hidden)."""
    shown = {"question": question.strip(), "text": ans.text}
    return (render.answer_html(render.with_ellipsis(ans)), shown,
            gr.update(choices=render.sentence_choices(ans.text, cut=ans.truncated), value=0),
            gr.update(value=False, visible=False))


@notices
def ask(pool: WorkspacePool, token: str, question: str):
    return shown_answer(question, pool.reader(token).ask(question))


def _sentence_number(choice) -> int:
    """The chosen sentence (0: the whole answer; anything unreadable counts as that)."""
    try:
        return max(0, int(choice or 0))
    except (TypeError, ValueError):
        return 0


def pick_sentence(choice, shown):
    """The correction box for the chosen sentence (its text, to edit) and the "end the
    answer there" box; for the whole answer, an empty box."""
    from melo_engine.sentences import split_sentences

    number = _sentence_number(choice)
    sentences = split_sentences(shown.get("text", "") if isinstance(shown, dict) else "")
    if not 1 <= number <= len(sentences):
        return gr.update(label="Correct answer", value=""), gr.update(value=False, visible=False)
    return (gr.update(label=f"Corrected sentence {number} (replaces it; the sentences before it stay)",
                      value=sentences[number - 1]), gr.update(visible=True))


def check_form(question, target, number: int) -> None:
    """An empty box named as the page labels it (the engine's own checks follow)."""
    if isinstance(question, str) and not question.strip():
        raise ValueError("the question is empty")
    if isinstance(target, str) and not target.strip():
        raise ValueError("the corrected sentence is empty" if number else "the correct answer is empty")


def answer_shown(question: str, shown) -> str:
    """The answer the page showed for `question`: the one a sentence correction corrects."""
    shown = shown if isinstance(shown, dict) else {}
    if not isinstance(question, str) or shown.get("question") != question.strip():
        raise ValueError("ask the model this question first: the sentences to correct come from its answer")
    return str(shown.get("text", ""))


EDIT_OUTPUTS = 9     # summary, before/after, side effects, training plot, the left panel (4), the button
APPLY, TRAINING = "Apply edit", "Training the edit…"
WAITING = "Waiting for the model… (your place in the queue is shown on the right)"


@user_errors
def edit(pool: WorkspacePool, token: str, question: str, target: str, choice=0, shown=None, end=False,
         progress=gr.Progress()):
    """(summary, before/after, side effects, training plot, the left panel's answer, what it
    showed, its sentence choices and end box, the Apply button)."""
    try:
        with pool.writing(token) as ed:
            yield from _edit(ed, question, target, choice, shown, end, progress)
    except FormRefused as err:
        # A form not filled in: one plain notice, and the panels keep what they showed.
        gr.Warning(str(err))


class FormRefused(Exception):
    """An edit's form that the engine refused before training: a notice, not an error."""


def trained(outputs: int, train, progress, learnt: str):
    """The steps every edit from the page takes before it is written, for the edit's
    callback to `yield from` (it returns what was trained): the button says it trains, the
    progress shows each step, a form the engine refuses becomes a notice (FormRefused), and
    gradio has a last chance to drop the edit of a visitor who has gone. `train(report)`
    trains and writes nothing; `outputs` is the callback's number of outputs."""
    skip = (gr.skip(),) * (outputs - 1)
    # gradio checks at every yield that the visitor is still connected, and never resumes a
    # generator whose visitor has gone: an edit whose page was closed, or whose API client
    # gave up, while it waited in the queue or trained is not trained or not written.
    yield *skip, gr.update(value=TRAINING)

    def report(step, loss):
        progress(None, desc=f"training step {step}, loss {loss:.3f} (stops once the {learnt} is learnt)")

    progress(None, desc="starting")
    try:
        pending = train(report)
    except ValueError as err:
        raise FormRefused(str(err)) from None
    yield skip + (gr.skip(),)
    return pending


def _edit(ed, question, target, choice, shown, end, progress):
    number = _sentence_number(choice)
    skip = (gr.skip(),) * (EDIT_OUTPUTS - 1)

    def train(report):
        check_form(question, target, number)
        return (ed.train_correction(question, number, target, answer=answer_shown(question, shown),
                                    progress=report, end=bool(end)) if number
                else ed.train(question, target, progress=report))

    pending = yield from trained(EDIT_OUTPUTS, train, progress, "answer")
    r = ed.commit(pending)
    side = render.side_effects_html(r.edit_id, ed.side_effects(r.edit_id))    # keys only: milliseconds
    yield render.edit_summary(ed, r), gr.skip(), side, plots.losses_figure(r.losses), *skip[4:], gr.skip()
    ans = ed.ask(question, compare_base=True)
    # The left panel shows the answer now (it showed the one before the edit).
    yield (gr.skip(), render.before_after_html(render.with_ellipsis(ans)), gr.skip(), gr.skip(),
           *shown_answer(question, ans), gr.skip())


@notices
def side_effects(pool: WorkspacePool, token: str, edit_id: str) -> str:
    """The side-effect check of an existing edit (History)."""
    if not edit_id:
        raise ValueError("choose an edit first")
    ed = pool.reader(token)
    return render.side_effects_html(edit_id, ed.side_effects(edit_id), render.words_for(ed))


def probe_lines(text, kind: str) -> list[tuple[str, str]]:
    """(kind, query) for every line with text in it (None: no lines)."""
    if text is not None and not isinstance(text, str):
        raise ValueError("the queries must be text, one per line")
    return [(kind, q.strip()) for q in (text or "").splitlines() if q.strip()]


def check_probe_count(n: int) -> None:
    if n > MAX_PROBES:
        raise ValueError(f"at most {MAX_PROBES} queries at once ({n} given)")


@notices
def probe(pool: WorkspacePool, token: str, paraphrases: str, unrelated: str):
    """(summary, table, tab-separated copy, probes for the map)."""
    ed = pool.reader(token)
    items = probe_lines(paraphrases, "paraphrase") + probe_lines(unrelated, "unrelated")
    if not items:
        raise ValueError("type one or more queries, one per line")
    check_probe_count(len(items))
    kinds, questions = [k for k, _ in items], [q for _, q in items]
    words = render.words_for(ed)
    answers = ([render.label_answer(c) for c in ed.classify_many(questions)] if words is render.TEXTS
               else [render.with_ellipsis(a) for a in ed.probe(questions)])
    probes = [{"text": q, "key": a.key, "block": a.block, "cluster": a.cluster, "kind": k,
               "distance": a.distance, "radius": a.radius} for k, q, a in zip(kinds, questions, answers)]
    return (render.probe_summary(kinds, answers, words), render.probe_html(kinds, questions, answers, words),
            render.probe_tsv(kinds, questions, answers, words), probes)


def index_map(pool: WorkspacePool, token: str, probes: list | None):
    try:
        ed = pool.reader(token)
    except ValueError:
        return plots.index_map({"points": [], "clusters": []})
    return plots.index_map(ed.index_snapshot(), probes or [])


def distances(pool: WorkspacePool, token: str, question: str):
    """The exact view beside the map: one question's distances to its nearest clusters. An
    empty box is a notice, and the chart keeps what it showed."""
    question = question.strip() if isinstance(question, str) else ""
    if not question:
        gr.Warning("type a question (or copy one of your probes) to see its distances")
        return gr.skip()
    try:
        return plots.distance_bars(question, pool.reader(token).distances(question))
    except ValueError as err:
        gr.Warning(str(err))
        return gr.skip()


def history(pool: WorkspacePool, token: str, deleted: list | None = None):
    """The history table (with the edits deleted in this visit) and the choices of the
    "choose an edit" menu."""
    try:
        ed = pool.reader(token)
    except ValueError:
        return "", gr.update(choices=[], value=None)
    edits = ed.edits()
    choices = [(f"{e['id']}: {e['prompt'][:60]} → {e['target'][:40]}", e["id"]) for e in reversed(edits)]
    return render.history_html(edits, deleted or [], render.words_for(ed)), gr.update(choices=choices, value=None)


@notices
def delete(pool: WorkspacePool, token: str, edit_id: str, deleted: list | None = None):
    """(what happened, the edits deleted in this visit, this one added, the side-effect
    panel emptied: it may show the deleted edit's check, in the present tense)."""
    edit_id = (edit_id or "").strip() if isinstance(edit_id, str) else edit_id
    if not edit_id:
        raise ValueError("choose an edit to delete first")
    record = pool.reader(token).record(edit_id)          # an unknown id makes no workspace
    ed = pool.editor(token)
    back = ed.delete(edit_id)
    msg = f"Deleted edit `{edit_id}`: its block is freed."
    if back:
        msg += (f" The earlier edit it had replaced, `{back[0]}`, is active again." if len(back) == 1 else
                f" The earlier edits it had replaced ({', '.join(f'`{e}`' for e in back)}) are active again.")
    now = ed.answered_by(record["prompt"])          # routing only: keys, nothing generated
    w = render.words_for(ed)
    msg += (f" Its {w.item} is now {w.by} by edit `{now['id']}` (*{html.escape(now['target'])}*)."
            if now is not None else f" Its {w.item} gets the {w.original}'s {w.reach} again.")
    trace = {k: record.get(k) for k in ("id", "prompt", "target", "created", "seconds")}
    return msg, [*(deleted or []), dict(trace, deleted=time.time())], ""


@notices
def export(pool: WorkspacePool, downloads: Downloads, token: str, request=None) -> str:
    """A link that downloads the export once, only for the browser that asked (downloads.py:
    the fetch must carry the workspace cookie the asking request carried)."""
    ed = pool.reader(token)
    active = sum(e["status"] == "active" for e in ed.edits())
    if not active:
        raise ValueError("there are no edits to export")
    path = ed.export(downloads.new_file(f"melo-edits-{time.strftime('%Y%m%d-%H%M%S')}.melo"))
    ticket = downloads.offer(path, owner=getattr(request, "cookies", {}).get(COOKIE))
    href = html.escape(ROUTE.format(ticket=ticket).lstrip("/"))   # relative: works under a proxy's path
    minutes = round(downloads.ttl_seconds / 60)
    return (f'<a class="melo-download" href="{href}" download="{html.escape(path.name)}">Download '
            f'{html.escape(path.name)}</a> ({active} edit{"s" if active != 1 else ""}, '
            f'{path.stat().st_size / 1e6:.1f} MB). The link works once, for {minutes} minutes.')


@user_errors
def import_file(pool: WorkspacePool, token: str, file) -> str:
    if file is None:
        raise ValueError("choose a .melo file to import")
    path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
    with pool.writing(token) as ed:
        report = ed.import_report(path)
    return render.import_summary(report)


@user_errors
def load_probes(pool: WorkspacePool, token: str, file) -> str:
    """Add a file of questions to the visitor's own list in the probe bank of its model and
    key (the workspace is made if it was not there: the list is the workspace's)."""
    if file is None:
        raise ValueError("choose a file of questions (.txt, .json or .csv)")
    path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
    added, skipped, count = questionlists.load(pool, token, path)
    return (f"Added {added} question{'s' if added != 1 else ''} ({skipped} already there); your checks "
            f"run over {count}. Every side-effect check of your workspace now runs over them too.")


def clear() -> str:
    """An empty message box (before an action whose error would otherwise sit beside the
    last action's message)."""
    return ""


@user_errors
def save_settings(pool: WorkspacePool, token: str, radius: float, rank: int, lr: float, iters: int) -> str:
    with pool.writing(token) as ed:
        cfg = ed.update_settings(init_radius=float(radius), rank_per_block=int(rank), lr=float(lr),
                                 max_iters=int(iters))
    return f"Saved: radius {cfg.init_radius:.3f}, rank {cfg.rank_per_block}, lr {cfg.lr:g}, up to {cfg.max_iters} steps."


@user_errors
def settings_values(pool: WorkspacePool, token: str):
    """The visitor's settings, each control enabled as it is filled (and the save button
    after them): the page draws them disabled, so nothing can be changed or saved over
    a placeholder (an empty number box shows 0) before the workspace's own values arrive.
    A workspace that cannot be read (the server full, the workspace damaged) leaves them
    disabled, and says so."""
    try:
        c = pool.reader(token).config
    except ValueError as err:
        raise ValueError(f"your settings cannot be shown ({err}); reload the page to try again") from None
    values = (c.model, c.key_source, c.prompt_mode, c.init_radius, c.rank_per_block, c.lr, c.max_iters)
    return tuple(gr.update(value=v, interactive=True) for v in values) + (gr.update(interactive=True),)


def model_choices(pool: WorkspacePool) -> list[tuple[str, str]]:
    """The Settings radio's choices: every model this server offers, the default first."""
    return [(f"{name} (default)" if name == pool.default_model else name, name) for name in pool.models]


def model_note(pool: WorkspacePool) -> str:
    """Beside the model choice: each offered model's size (counted on its weights, or read from
    its cached copy) and licence, and whether this server has it loaded yet."""
    from .models import footprint, licence

    shelf = pool.shelf          # None on a front of the Ray engine: its replicas hold the model
    lines = []
    for name in pool.models:
        fp = shelf.footprint(name) if shelf is not None else footprint(name)
        size = (f"{fp.parameters / 1e6:,.0f} million parameters, about {fp.weight_bytes / 1e9:.2f} GB of memory "
                f"for its weights" if fp else "its size shows once it has been converted (on its first use)")
        state = ("loaded by the engine's replicas" if shelf is None else
                 "loaded on this server" if shelf.loaded(name) else "loaded on its first use, then shared")
        lines.append(f"- **{name}**: {size}; {state}. Licence: {licence(name)}.")
    return "\n".join(lines)


@user_errors
def set_model(pool: WorkspacePool, token: str, name: str):
    """(message, model shown): a workspace without edits is remade on the chosen model (its
    first use on this server loads it); one with edits is refused and keeps its model."""
    try:
        ed = pool.set_model(token, name)
    except ValueError as err:
        return f"Not changed: {err}.", pool.model_of(token)
    info = ed.model_info()
    return (f"Your workspace now edits **{info['model']}**: your questions reach it "
            f"{PROMPT_FORMS[info['prompt_form']]}; radius {ed.config.init_radius:.3f} (calibrated for it).",
            info["model"])


def key_sources() -> list[tuple[str, str]]:
    """The Settings radio's choices: every registered key source, by its title."""
    return [(KEY_SOURCES.get(name).title, name) for name in KEY_SOURCES.names()]


def key_info(pool: WorkspacePool, token: str) -> str:
    """About: which key this workspace routes by, and why (with the key study's figures)."""
    try:
        c = pool.reader(token).config
    except ValueError:
        return ""
    source = KEY_SOURCES.get(c.key_source)
    figures = published.key_figures(c.key_source, c.whitened)
    info = pool.reader(token).model_info()
    return (f"**Your workspace routes by {source.summary}.** {source.why} {figures} Radius {c.init_radius:.3f}, "
            f"calibrated for this key (key distances run from 0, the same question, to 2, the opposite). You "
            f"can change the key (and the model) under Settings while the workspace has no edits.\n\n"
            f"**Model: {info['model']}** ({info['licence']}), on {info['device']}. Your questions reach it "
            f"{PROMPT_FORMS[info['prompt_form']]}.").replace("  ", " ")


# How a question reaches the model (Backbone.prompt_form), in About.
PROMPT_FORMS = {
    "chat template": "as a user's turn of its chat template, because it is a chat model that has one",
    "question-answer": "in a question-answer form (\"Q: your question\", then \"A:\"), because it is a base "
                       "model without a chat template",
    "plain text": "as plain text it continues (completion mode)",
    "classification": "whole, as a text to label (a classifier reads no prompt)",
    "question to the encoder": "as it is, to the encoder (an encoder-decoder: the decoder writes the answer)",
}


def _reroute(ed, setting: str, value: str, setter):
    """(message, radius, choice shown) after changing a setting that decides what keys mean:
    a refusal leaves the choice as it truly is."""
    try:
        cfg = setter(value)
    except ValueError as err:
        return f"Not changed: {err}.", ed.config.init_radius, getattr(ed.config, setting)
    return None, cfg.init_radius, getattr(cfg, setting)


@user_errors
def set_key_source(pool: WorkspacePool, token: str, source: str):
    ed = pool.editor(token)
    msg, radius, shown = _reroute(ed, "key_source", source, ed.set_key_source)
    return (msg or f"Routing by the **{shown}** key from now on; radius {radius:.3f} (calibrated for it).",
            radius, shown)


PROMPT_MODES = {"chat": "your text goes to the model as a chat turn, and the answer ends the turn",
                "completion": "your text goes to the model as plain text, which it continues (no chat template)"}


@user_errors
def set_prompt_mode(pool: WorkspacePool, token: str, mode: str):
    ed = pool.editor(token)
    msg, radius, shown = _reroute(ed, "prompt_mode", mode, ed.set_prompt_mode)
    return (msg or f"**{shown.capitalize()} mode:** {PROMPT_MODES[shown]}; radius {radius:.3f} (calibrated "
                   f"for it).", radius, shown)


@user_errors
def reset(pool: WorkspacePool, token: str, confirmed: bool) -> str:
    if not confirmed:
        raise ValueError("tick the box to confirm that every edit should be removed")
    ed = pool.existing(token)               # nothing to reset where nothing was made
    if ed is not None:
        ed.reset(default_settings=True)
    return "The workspace is empty again (the model is the original) and the settings are back to their defaults."


BENCH_MAX_EDITS = 50


@user_errors
def claim_benchmark(pool: WorkspacePool, token: str) -> str:
    """Before the benchmark joins its queue: a visitor of this server, with no other
    benchmark queued or running (lane.BenchmarkLane). Returns the status box's first line:
    a busy lane is said there (it stays readable under the queue place), not refused."""
    pool.tokens.folder(token)           # a token this server issued
    pool.benchmarks.claim(token)
    if pool.benchmarks.busy():
        return ("Another visitor's benchmark is running: yours waits for the lane (your place shows here). "
                "Edits and questions are not held up by either.")
    return "Starting the benchmark lane..."


def stop_benchmark(pool: WorkspacePool, token: str) -> str:
    """Stop: the visitor's run is killed, or, still waiting for its turn, gives its claim
    back, so the visitor can start another (the event's cancellation ends the page's part)."""
    if pool.tokens.valid(token):
        pool.benchmarks.stop(token)
    return STOPPED


STOPPED = "Stopped. Nothing of the run is kept; press Run benchmark to start another."


def benchmark_choice(n, methods) -> tuple[int, list[str]]:
    """The run's size and methods, checked (registered methods, in the registry's order)."""
    try:
        n = int(n or 0)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= BENCH_MAX_EDITS:
        raise ValueError(f"choose between 1 and {BENCH_MAX_EDITS} edits")
    chosen = [m for m in METHODS.names() if m in (methods or [])]
    if not chosen:
        raise ValueError("choose at least one method")
    return n, chosen


@user_errors
def run_benchmark(pool: WorkspacePool, token: str, n, methods):
    """A small zsRE run: the same table as `python -m melo_engine.bench edits`, in the
    benchmark lane's own process (lane.py), for a visitor who claimed it (`claim_benchmark`).
    Stopping the event (the Stop button, or the page closing) kills the run."""
    pool.tokens.folder(token)
    if not pool.benchmarks.take(token):           # Stop came before the run started
        yield STOPPED, gr.skip(), gr.skip()
        return
    try:
        n, methods = benchmark_choice(n, methods)
        model = pool.benchmark_model(token)          # the visitor's workspace's model
        on = model or pool.default_model
        for step in pool.benchmarks.run(token, n, methods, model):
            if isinstance(step, Progress) and step.waiting:
                yield (f"Waiting for the benchmark lane: {step.text}. Edits and questions are not held up; "
                       "Stop gives your place back."), gr.skip(), gr.skip()
            elif isinstance(step, Progress):
                # Shown as text: a streaming event hides gradio's progress bar after its first
                # update, and each update is where Stop can end the run.
                yield (f"Running in the benchmark lane on {on}: {step.text} ({step.fraction:.0%}). "
                       f"Edits and questions go on meanwhile; Stop ends the run."), gr.skip(), gr.skip()
            else:
                yield (f"Done on {on}: {n} edit{'s' * (n != 1)} per method, the same stream for each."), \
                    published.table_rows(step), plots.retention_figure(step)
                return
        yield STOPPED, gr.skip(), gr.skip()            # ended by Stop: no result, nothing kept
    finally:
        pool.benchmarks.release(token)


@user_errors
def published_run(name: str):
    """A published run (docs/results): where it comes from, its table and its retention curve."""
    if not name:
        return "", None, None
    res = published.benchmark_run(name)
    return published.caption(name, res), published.table_rows(res), plots.retention_figure(res)
