"""Callbacks: plain functions that call the engine and return what the page shows.

Each takes the WorkspacePool and the visitor's token first (layout.py binds them). Engine
errors are ValueErrors with a message meant for the user; `user_errors` turns them into a
short gr.Error instead of a traceback.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import html
import inspect
import time

import gradio as gr

from . import plots
from .downloads import ROUTE, Downloads
from .sessions import WorkspacePool

MAX_PROBES = 20
HISTORY_COLUMNS = ["id", "prompt", "target", "block", "cluster", "action", "status", "seconds", "created"]


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


# ---- rendering -----------------------------------------------------------------------
def routing_badge(block, distance, radius) -> str:
    """'block N' or 'none: original model', with distance against radius as a number and a bar."""
    fired = block is not None
    label = f"block {block}" if fired else "none: original model"
    color = "#c0392b" if fired else "#7f8c8d"
    if distance is None:
        detail = '<span class="melo-dist">index empty</span>'
    else:
        # The bar spans 0..2*radius; the tick marks the radius.
        frac = min(distance / (2 * radius), 1.0) if radius else 1.0
        detail = (f'<span class="melo-dist">distance {distance:.3f} / radius {radius:.3f}</span>'
                  f'<span class="melo-bar"><span class="melo-fill" style="width:{100 * frac:.0f}%;'
                  f'background:{color}"></span><span class="melo-tick"></span></span>')
    return f'<span class="melo-badge" style="background:{color}">{html.escape(label)}</span> {detail}'


def diff_html(edited: str, base: str) -> tuple[str, str]:
    """Both texts with the words that differ highlighted."""
    a, b = edited.split(), base.split()
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    out_a, out_b = [], []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        wa, wb = html.escape(" ".join(a[i1:i2])), html.escape(" ".join(b[j1:j2]))
        if op == "equal":
            out_a.append(wa)
            out_b.append(wb)
        else:
            if wa:
                out_a.append(f'<mark class="melo-new">{wa}</mark>')
            if wb:
                out_b.append(f'<mark class="melo-old">{wb}</mark>')
    return " ".join(out_a), " ".join(out_b)


def answer_html(ans) -> str:
    return (f'<div class="melo-answer"><div class="melo-text">{html.escape(ans.text)}</div>'
            f'<div class="melo-route">{routing_badge(ans.block, ans.distance, ans.radius)}'
            f' <span class="melo-time">answered in {ans.seconds:.2f} s</span></div></div>')


def probe_html(questions: list[str], answers) -> str:
    rows = []
    for q, a in zip(questions, answers):
        edited, base = diff_html(a.text, a.base_text or "")
        same = "" if a.text != a.base_text else ' <span class="melo-same">(identical)</span>'
        rows.append(f"<tr><td>{html.escape(q)}</td><td>{edited}</td><td>{base}{same}</td>"
                    f"<td>{routing_badge(a.block, a.distance, a.radius)}</td></tr>")
    return ('<table class="melo-probe"><thead><tr><th>query</th><th>edited model</th><th>unedited model</th>'
            '<th>block fired</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def history_rows(ed) -> list[list]:
    rows = []
    for e in reversed(ed.edits()):
        status = e["status"] + (f" by {e['superseded_by']}" if e.get("superseded_by") else "")
        rows.append([e["id"], e["prompt"], e["target"], "" if e.get("block") is None else e["block"],
                     e.get("cluster") or "", e.get("action", ""), status, e.get("seconds", 0.0),
                     time.strftime("%H:%M:%S", time.localtime(e.get("created", 0)))])
    return rows


def losses_figure(losses: list[float]):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=list(range(1, len(losses) + 1)), y=losses, mode="lines+markers"))
    fig.update_layout(height=220, template="plotly_white", margin=dict(l=40, r=10, t=30, b=30),
                      title=dict(text="training loss per step", font=dict(size=12)),
                      xaxis_title="step", yaxis_title="loss")
    return fig


# ---- actions -------------------------------------------------------------------------
@user_errors
def ask(pool: WorkspacePool, token: str, question: str) -> str:
    ed = pool.editor(token)
    return answer_html(ed.ask(question))


@user_errors
def edit(pool: WorkspacePool, token: str, question: str, target: str, progress=gr.Progress()):
    ed = pool.editor(token)
    max_iters = ed.config.max_iters
    progress(0, desc="waiting for the model")

    def report(step, loss):
        progress(step / max_iters, desc=f"training step {step}: loss {loss:.3f}")

    pending = ed.train(question, target, progress=report)     # nothing written yet
    # gradio checks at every yield that the visitor is still connected, and never resumes a
    # generator whose visitor has gone: an edit whose page was closed, or whose API client
    # gave up, while it waited in the queue or trained is not written.
    yield gr.skip(), gr.skip(), gr.skip()
    r = ed.commit(pending)
    after = ed.ask(question)
    forgotten = (f" It split a conflicting cluster; forgotten earlier edits: {', '.join(r.forgotten)}."
                 if r.forgotten else "")
    if r.moved:
        forgotten += (f" Earlier edits left outside the shrunk cluster moved to clusters of their own "
                      f"(still active): {', '.join(r.moved)}.")
    what = {"new": "opened a new cluster", "beside": "opened a new cluster",
            "joined": "joined the cluster of an earlier edit of this question with the same answer",
            "superseded": "opened a new cluster",
            "conflict": "split a cluster that held a different answer"}[r.action]
    if r.superseded:
        forgotten += (f" It **replaces** earlier edit(s) of the same question: {', '.join(f'`{e}`' for e in r.superseded)}"
                      f" (kept as superseded in History; undoing this edit brings them back).")
    summary = (f"**Edit `{r.edit_id}`** trained **block {r.block}** in {r.steps} steps ({r.seconds:.1f} s) "
               f"and {what} (`{r.cluster}`).{forgotten}")
    yield summary, answer_html(after), losses_figure(r.losses)


@user_errors
def probe(pool: WorkspacePool, token: str, text: str):
    ed = pool.editor(token)
    questions = [q.strip() for q in (text or "").splitlines() if q.strip()]
    if not questions:
        raise ValueError("type one or more queries, one per line")
    if len(questions) > MAX_PROBES:
        raise ValueError(f"at most {MAX_PROBES} queries at once ({len(questions)} given)")
    answers = ed.probe(questions)
    probes = [{"text": q, "key": ed.key(q).tolist(), "block": a.block, "cluster": a.cluster}
              for q, a in zip(questions, answers)]
    return probe_html(questions, answers), probes


def index_map(pool: WorkspacePool, token: str, probes: list | None):
    try:
        ed = pool.editor(token)
    except ValueError:
        return plots.index_map({"points": [], "clusters": []})
    return plots.index_map(ed.index_snapshot(), probes or [])


def history(pool: WorkspacePool, token: str):
    """The history table and the choices of the "edit to delete" menu."""
    try:
        ed = pool.editor(token)
    except ValueError:
        return [], gr.update(choices=[], value=None)
    choices = [(f"{e['id']}: {e['prompt'][:60]} → {e['target'][:40]}", e["id"]) for e in reversed(ed.edits())]
    return history_rows(ed), gr.update(choices=choices, value=None)


@user_errors
def delete(pool: WorkspacePool, token: str, edit_id: str) -> str:
    edit_id = (edit_id or "").strip()
    if not edit_id:
        raise ValueError("choose an edit to delete first")
    ed = pool.editor(token)
    back = ed.delete(edit_id)
    if back:
        return (f"Deleted edit `{edit_id}`: its block is freed, and the earlier edit(s) it had replaced "
                f"({', '.join(f'`{e}`' for e in back)}) answer again.")
    return f"Deleted edit `{edit_id}`: its block is freed."


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
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    return c.key_source, c.init_radius, c.rank_per_block, c.lr, c.max_iters


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


@user_errors
def set_key_source(pool: WorkspacePool, token: str, source: str):
    """(message, radius, key source shown): a refusal leaves the choice as it truly is."""
    ed = pool.editor(token)
    try:
        cfg = ed.set_key_source(source)
    except ValueError as err:
        return f"Not changed: {err}.", ed.config.init_radius, ed.config.key_source
    return (f"Routing by the **{cfg.key_source}** key from now on; radius {cfg.init_radius:.3f} "
            f"(calibrated for it)."), cfg.init_radius, cfg.key_source


@user_errors
def reset(pool: WorkspacePool, token: str, confirmed: bool) -> str:
    if not confirmed:
        raise ValueError("tick the box to confirm that every edit should be removed")
    pool.editor(token).reset()
    return "The workspace is empty again: the model is the original."


BENCH_METHODS = ("melo", "grace", "lora")
BENCH_MAX_EDITS = 50
BENCH_COLUMNS = ["method", "edit success", "retention", "generality", "locality", "s / edit", "params / edit"]


def retention_figure(res: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    # Distinct dashes: methods that keep every edit draw the same line at 1.0.
    dashes = {"melo": "solid", "grace": "dash", "lora": "dot"}
    for name, m in res["methods"].items():
        curve = m["retention_curve"]
        fig.add_trace(go.Scatter(x=[c["edits"] for c in curve], y=[c["retention"] for c in curve],
                                 mode="lines+markers", name=name,
                                 line=dict(dash=dashes.get(name, "solid"), width=4 if name == "melo" else 2)))
    fig.update_layout(height=320, template="plotly_white", margin=dict(l=40, r=10, t=40, b=40),
                      title=dict(text="retention of all earlier edits", font=dict(size=13)),
                      xaxis_title="edits made", yaxis_title="retention", yaxis_range=[0, 1.05])
    return fig


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
    return rows, retention_figure(res)


# ---- API (gradio_client): plain data in, plain data out -------------------------------
def api_answer(ans) -> dict:
    return dataclasses.asdict(ans)


def api_edit_result(r) -> dict:
    return dataclasses.asdict(r)
