"""Callbacks: plain functions that call the engine and return what the page shows (render.py
makes the HTML, plots.py the figures).

Each takes the WorkspacePool and the visitor's token first (layout.py binds them). Engine
errors are ValueErrors with a message meant for the user; `user_errors` turns them into a
short gr.Error instead of a traceback.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import inspect
import time

import gradio as gr

from melo_engine.registry import METHODS

from . import plots, render
from .downloads import ROUTE, Downloads
from .sessions import WorkspacePool

MAX_PROBES = 20


def user_errors(fn):
    """Show a ValueError (bad input, unknown id, bad file) as a short message, not a traceback."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ValueError as err:
                raise gr.Error(str(err), print_exception=False) from None
        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None
    return wrapper


def visitor_token(pool: WorkspacePool, token: str | None) -> str:
    """The browser's workspace token, or a new one on a first visit (or for one this server did
    not issue: an older token, or one somebody typed in)."""
    return token if pool.tokens.valid(token) else pool.tokens.new()


# ---- actions -------------------------------------------------------------------------
@user_errors
def ask(pool: WorkspacePool, token: str, question: str):
    """(the answer, numbered by sentence; what was answered, for a sentence correction; the
    "what to correct" choices, back to the whole answer)."""
    ed = pool.editor(token)
    ans = ed.ask(question)
    shown = {"question": question.strip(), "text": ans.text}
    return (render.answer_html(render.with_ellipsis(ed, ans)), shown,
            gr.update(choices=render.sentence_choices(ans.text), value=0), gr.update(value=False, visible=False))


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


def sentence_prefix(ed, question: str, choice, shown) -> str | None:
    """The text a sentence correction keeps, from the answer the page showed (None: the
    whole answer is replaced)."""
    number = _sentence_number(choice)
    if not number:
        return None
    shown = shown if isinstance(shown, dict) else {}
    if not isinstance(question, str) or shown.get("question") != question.strip():
        raise ValueError("ask the model this question first: the sentences to correct come from its answer")
    return ed.sentence_prefix(question, number, answer=str(shown.get("text", "")))


@user_errors
def edit(pool: WorkspacePool, token: str, question: str, target: str, choice=0, shown=None, end=False,
         progress=gr.Progress()):
    """(summary, before/after, side effects, training plot)."""
    ed = pool.editor(token)
    progress(None, desc="waiting for the model")

    def report(step, loss):
        progress(None, desc=f"training step {step}, loss {loss:.3f} (stops once the answer is learnt)")

    try:
        prefix = sentence_prefix(ed, question, choice, shown)
        pending = ed.train(question, target, progress=report, prefix=prefix, end=bool(end))   # nothing written yet
    except ValueError as err:
        # A form not filled in: one plain notice, and the panels keep what they showed.
        gr.Warning(str(err))
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    # gradio checks at every yield that the visitor is still connected, and never resumes a
    # generator whose visitor has gone: an edit whose page was closed, or whose API client
    # gave up, while it waited in the queue or trained is not written.
    yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
    r = ed.commit(pending)
    side = render.side_effects_html(r.edit_id, ed.side_effects(r.edit_id))    # keys only: milliseconds
    yield render.edit_summary(ed, r), gr.skip(), side, plots.losses_figure(r.losses)
    yield gr.skip(), render.before_after_html(render.with_ellipsis(ed, ed.ask(question, compare_base=True))), gr.skip(), gr.skip()


@user_errors
def side_effects(pool: WorkspacePool, token: str, edit_id: str) -> str:
    """The side-effect check of an existing edit (History)."""
    if not edit_id:
        raise ValueError("choose an edit first")
    return render.side_effects_html(edit_id, pool.editor(token).side_effects(edit_id))


def probe_lines(text, kind: str) -> list[tuple[str, str]]:
    """(kind, query) for every line with text in it (None: no lines)."""
    if text is not None and not isinstance(text, str):
        raise ValueError("the queries must be text, one per line")
    return [(kind, q.strip()) for q in (text or "").splitlines() if q.strip()]


def check_probe_count(n: int) -> None:
    if n > MAX_PROBES:
        raise ValueError(f"at most {MAX_PROBES} queries at once ({n} given)")


@user_errors
def probe(pool: WorkspacePool, token: str, paraphrases: str, unrelated: str):
    """(summary, table, tab-separated copy, probes for the map)."""
    ed = pool.editor(token)
    items = probe_lines(paraphrases, "paraphrase") + probe_lines(unrelated, "unrelated")
    if not items:
        raise ValueError("type one or more queries, one per line")
    check_probe_count(len(items))
    kinds, questions = [k for k, _ in items], [q for _, q in items]
    answers = [render.with_ellipsis(ed, a) for a in ed.probe(questions)]
    keys = ed.keyer.keys(questions)          # for the map: one batch
    probes = [{"text": q, "key": k.tolist(), "block": a.block, "cluster": a.cluster,
               "distance": a.distance, "radius": a.radius} for q, k, a in zip(questions, keys, answers)]
    return (render.probe_summary(kinds, answers), render.probe_html(kinds, questions, answers),
            render.probe_tsv(kinds, questions, answers), probes)


def index_map(pool: WorkspacePool, token: str, probes: list | None):
    try:
        ed = pool.editor(token)
    except ValueError:
        return plots.index_map({"points": [], "clusters": []})
    return plots.index_map(ed.index_snapshot(), probes or [])


@user_errors
def distances(pool: WorkspacePool, token: str, question: str):
    """The exact view beside the map: one question's distances to its nearest clusters."""
    question = (question or "").strip() if isinstance(question, str) else question
    if not question:
        raise ValueError("type a question (or copy one of your probes) to see its distances")
    return plots.distance_bars(question, pool.editor(token).distances(question))


def history(pool: WorkspacePool, token: str):
    """The history table and the choices of the "choose an edit" menu."""
    try:
        ed = pool.editor(token)
    except ValueError:
        return "", gr.update(choices=[], value=None)
    choices = [(f"{e['id']}: {e['prompt'][:60]} → {e['target'][:40]}", e["id"]) for e in reversed(ed.edits())]
    return render.history_html(ed), gr.update(choices=choices, value=None)


@user_errors
def delete(pool: WorkspacePool, token: str, edit_id: str) -> str:
    edit_id = (edit_id or "").strip() if isinstance(edit_id, str) else edit_id
    if not edit_id:
        raise ValueError("choose an edit to delete first")
    ed = pool.editor(token)
    prompt = ed.record(edit_id)["prompt"]
    back = ed.delete(edit_id)
    msg = f"Deleted edit `{edit_id}`: its block is freed."
    if back:
        msg += f" The earlier edit(s) it had replaced ({', '.join(f'`{e}`' for e in back)}) are active again."
    now = ed.answered_by(prompt)      # what its question gets now, from the routing (keys only)
    msg += (f" Its question is now answered by edit `{now['id']}` (*{html.escape(now['target'])}*)."
            if now is not None else " Its question gets the original model's answer again.")
    return msg


@user_errors
def export(pool: WorkspacePool, downloads: Downloads, token: str) -> str:
    """A link that downloads the export once (downloads.py: nobody else can fetch it)."""
    ed = pool.editor(token)
    active = sum(e["status"] == "active" for e in ed.edits())
    if not active:
        raise ValueError("there are no edits to export")
    path = ed.export(downloads.new_file(f"melo-edits-{time.strftime('%Y%m%d-%H%M%S')}.melo"))
    ticket = downloads.offer(path)
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
    ids = pool.editor(token).import_(path)
    return f"Imported {len(ids)} edit(s)."


@user_errors
def save_settings(pool: WorkspacePool, token: str, radius: float, rank: int, lr: float, iters: int) -> str:
    ed = pool.editor(token)
    cfg = ed.update_settings(init_radius=float(radius), rank_per_block=int(rank), lr=float(lr), max_iters=int(iters))
    return f"Saved: radius {cfg.init_radius:.3f}, rank {cfg.rank_per_block}, lr {cfg.lr:g}, up to {cfg.max_iters} steps."


def settings_values(pool: WorkspacePool, token: str):
    try:
        c = pool.editor(token).config
    except ValueError:
        return (gr.skip(),) * 6
    return c.key_source, c.prompt_mode, c.init_radius, c.rank_per_block, c.lr, c.max_iters


KEY_SOURCES = {   # (what the key is, why)
    "sentence": ("a sentence encoder (all-MiniLM-L6-v2, whitened)",
                 "It puts questions of the same meaning together: measured on held-out paraphrases, 99 % of "
                 "zsRE's and 92 % of CounterFact's reach their edit while unrelated questions stay untouched."),
    "model": ("the model's own hidden state at layer 10",
              "Averaged over your question, this is the paper's neuron index: free to compute, but it groups "
              "questions by template more than by subject, so fewer paraphrases reach their edit (76 % and "
              "4 % on the same tests)."),
}


def key_info(pool: WorkspacePool, token: str) -> str:
    """About: which key this workspace routes by, and why."""
    try:
        c = pool.editor(token).config
    except ValueError:
        return ""
    what, why = KEY_SOURCES[c.key_source]
    return (f"**Your workspace routes by {what}.** {why} Radius {c.init_radius:.3f}, calibrated for this "
            f"key (key distances run from 0, the same question, to 2, the opposite). You can change the key "
            f"under Settings while the workspace has no edits.")


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
    pool.editor(token).reset(default_settings=True)
    return "The workspace is empty again (the model is the original) and the settings are back to their defaults."


BENCH_METHODS = tuple(METHODS.names())
BENCH_MAX_EDITS = 50
BENCH_COLUMNS = ["method", "edit success", "retention", "generality", "locality", "s / edit", "params / edit"]
# All four scores are teacher-forced token accuracy: the share of answer tokens the model
# predicts right given the tokens before them (the paper's measure), from 0 to 1.


@user_errors
def run_benchmark(pool: WorkspacePool, n, methods, progress=gr.Progress()):
    """A small zsRE run on the shared model: the same table as `python -m melo_engine.bench edits`."""
    from melo_engine.bench import edits_benchmark

    n = int(n or 0)
    if not 1 <= n <= BENCH_MAX_EDITS:
        raise ValueError(f"choose between 1 and {BENCH_MAX_EDITS} edits")
    methods = [m for m in BENCH_METHODS if m in (methods or [])]
    if not methods:
        raise ValueError("choose at least one method")
    order = {m: i for i, m in enumerate(methods)}

    def report(name, done, total):
        progress((order[name] * total + done) / (len(methods) * total), desc=f"{name}: {done}/{total} edits")

    res = edits_benchmark("zsre", n, methods, backbone=pool.backbone, show_progress=False, progress=report)
    rows = [[name, round(m["edit_success"], 3), round(m["retention"], 3), round(m["generality"], 3),
             round(m["locality"], 3), round(m["seconds_per_edit"], 2), m["params_per_edit"]]
            for name, m in res["methods"].items()]
    return rows, plots.retention_figure(res)


# ---- API (gradio_client): plain data in, plain data out -------------------------------
def api_answer(ans) -> dict:
    return dataclasses.asdict(ans)


def api_edit_result(r) -> dict:
    return dataclasses.asdict(r)
