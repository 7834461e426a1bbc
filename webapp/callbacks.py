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
SIDE_EFFECT_ROWS = 10
HISTORY_COLUMNS = ["id", "question", "answer", "status", "placed", "block", "made", "seconds"]


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
FIRED, NOT_FIRED = "#2c6fbb", "#7f8c8d"    # blue and grey: which model answered, not right or wrong


def routing_badge(block, distance, radius) -> str:
    """'fix applied (block N)' or 'original model', with distance against radius as numbers
    and a bar whose tick is the radius (the fix applies up to the tick)."""
    fired = block is not None
    label = f"fix applied (block {block})" if fired else "original model"
    color = FIRED if fired else NOT_FIRED
    if distance is None:
        detail = '<span class="melo-dist">no edits yet</span>'
    else:
        # The bar spans 0..2*radius, the tick at the middle is the radius. A radius of 0
        # (a cluster shrunk to its own point) fires only at distance 0.
        frac = min(distance / (2 * radius), 1.0) if radius else (0.0 if distance == 0 else 1.0)
        detail = (f'<span class="melo-dist" title="distance between keys, 0 = the same question; the fix '
                  f'applies when it is at most the radius">distance {distance:.3f} / radius {radius:.3f}</span>'
                  f'<span class="melo-bar"><span class="melo-fill" style="width:{100 * frac:.0f}%;'
                  f'background:{color}"></span><span class="melo-tick"></span></span>')
    return f'<span class="melo-badge" style="background:{color}">{html.escape(label)}</span> {detail}'


def diff_html(edited: str, base: str) -> tuple[str, str]:
    """Both texts with the words that differ highlighted (one neutral colour: a changed word
    is not a right or a wrong one)."""
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
                out_a.append(f'<mark class="melo-diff">{wa}</mark>')
            if wb:
                out_b.append(f'<mark class="melo-diff">{wb}</mark>')
    return " ".join(out_a), " ".join(out_b)


def with_ellipsis(ed, ans):
    """An answer that ran to the length limit stops mid-sentence: mark it with an ellipsis."""
    limit = ed.config.max_new_tokens - 2

    def mark(text):
        if not text or text.endswith((".", "!", "?", "…", '"', "”", ")")):
            return text
        cut = len(ed.backbone.tokenizer.encode(text, add_special_tokens=False)) >= limit
        return text + " …" if cut else text
    return dataclasses.replace(ans, text=mark(ans.text), base_text=mark(ans.base_text))


def answer_html(ans) -> str:
    return (f'<div class="melo-answer"><div class="melo-text">{html.escape(ans.text)}</div>'
            f'<div class="melo-route">{routing_badge(ans.block, ans.distance, ans.radius)}'
            f' <span class="melo-time">answered in {ans.seconds:.2f} s</span></div></div>')


def before_after_html(ans) -> str:
    """The question's answer without and with the edit, labelled."""
    after, before = diff_html(ans.text, ans.base_text or ans.text)
    return (f'<div class="melo-answer"><div class="melo-label">Before (original model)</div>'
            f'<div class="melo-text melo-before">{before}</div>'
            f'<div class="melo-label">After (with the edit)</div><div class="melo-text melo-after">{after}</div>'
            f'<div class="melo-route">{routing_badge(ans.block, ans.distance, ans.radius)}</div></div>')


def side_effects_html(edit_id: str, neighbours) -> str:
    """The reference questions nearest an edit: the ones it now fires for first and marked."""
    firing = [n for n in neighbours if n.fires and n.distance > 1e-6]
    head = (f'<div class="melo-warn">This edit would also answer {len(firing)} other question'
            f'{"s" if len(firing) != 1 else ""} from the reference list: check them in Probe.</div>'
            if firing else '<div class="melo-ok">None of the reference questions near this edit would '
            'get it.</div>')
    rows = []
    shown = neighbours[:SIDE_EFFECT_ROWS]
    for n in shown:
        verdict = ("<b>gets this edit</b>" if n.fires else
                   f"answered by edit {html.escape(n.fired_edit)}" if n.fired_edit else "stays original")
        rows.append(f'<tr class="{"melo-fires" if n.fires else ""}"><td>{html.escape(n.question)}</td>'
                    f'<td class="melo-num">{n.distance:.3f}</td><td class="melo-num">{n.radius:.3f}</td>'
                    f'<td>{verdict}</td></tr>')
    return (f'<div class="melo-side"><div class="melo-label">Side-effect check for edit {html.escape(edit_id)}: '
            f'reference questions nearest it (keys only, nothing generated)</div>{head}'
            '<table class="melo-probe"><thead><tr><th>question</th><th>distance</th><th>radius</th>'
            '<th>now</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
            + (f'<div class="melo-same">and {len(neighbours) - len(shown)} more that get it</div>'
               if len(neighbours) > len(shown) else "") + "</div>")


def probe_summary(kinds: list[str], answers) -> str:
    """'2 of 3 paraphrases got the fix; 0 of 3 unrelated answers changed' (Markdown)."""
    para = [a for k, a in zip(kinds, answers) if k == "paraphrase"]
    other = [a for k, a in zip(kinds, answers) if k == "unrelated"]
    parts = []
    if para:
        got = sum(a.block is not None for a in para)
        parts.append(f"**{got} of {len(para)}** paraphrase{'s' if len(para) != 1 else ''} got the fix")
    if other:
        changed = sum(a.text != a.base_text for a in other)
        parts.append(f"**{changed} of {len(other)}** unrelated answer{'s' if len(other) != 1 else ''} changed"
                     + (" (should be 0)" if changed else ""))
    return "; ".join(parts) + "."


def probe_html(kinds: list[str], questions: list[str], answers) -> str:
    rows = []
    for kind, q, a in zip(kinds, questions, answers):
        edited, base = diff_html(a.text, a.base_text or "")
        same = "" if a.text != a.base_text else ' <span class="melo-same">(identical)</span>'
        rows.append(f"<tr><td>{html.escape(q)}</td><td>{kind}</td><td>{edited}</td><td>{base}{same}</td>"
                    f"<td>{routing_badge(a.block, a.distance, a.radius)}</td></tr>")
    return ('<table class="melo-probe"><thead><tr><th>query</th><th>kind</th><th>answer now</th>'
            '<th>original model</th><th>what answered</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def probe_tsv(kinds: list[str], questions: list[str], answers) -> str:
    """The results as tab-separated text, to paste into a spreadsheet."""
    def cell(x):
        return str(x).replace("\t", " ").replace("\n", " ")
    lines = ["query\tkind\tanswer now\toriginal model\tfix applied\tblock\tdistance\tradius"]
    for kind, q, a in zip(kinds, questions, answers):
        lines.append("\t".join(cell(x) for x in (q, kind, a.text, a.base_text, "yes" if a.block is not None else "no",
                                                  "" if a.block is None else a.block,
                                                  "" if a.distance is None else f"{a.distance:.4f}",
                                                  "" if a.radius is None else f"{a.radius:.4f}")))
    return "\n".join(lines)


def history_rows(ed) -> list[list]:
    rows = []
    for e in reversed(ed.edits()):
        status = e["status"] + (f" by {e['superseded_by']}" if e.get("superseded_by") else "")
        placed = e.get("action", "") + (f" ({e['cluster']})" if e.get("cluster") else "")
        rows.append([e["id"], e["prompt"], e["target"], status, placed,
                     "" if e.get("block") is None else e["block"],
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(e.get("created", 0))),
                     f"{e.get('seconds', 0.0):.1f}"])
    return rows


def history_html(ed) -> str:
    rows = history_rows(ed)
    if not rows:
        return '<div class="melo-same">No edits yet.</div>'
    head = "".join(f"<th>{c}</th>" for c in HISTORY_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="melo-probe melo-history"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


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
    return answer_html(with_ellipsis(ed, ed.ask(question)))


WHAT_HAPPENED = {"new": "It is the first edit of a question like this one.",
                 "beside": "It is the first edit of a question like this one.",
                 "joined": "It joins an earlier edit of this question with the same answer.",
                 "superseded": "",
                 "conflict": "It split the cluster of an earlier edit with another answer."}


def _quoted(text: str) -> str:
    return f"“{html.escape(text)}”"


def edit_summary(ed, r) -> str:
    """What the edit did, in words for a class: what is active now, and what it replaced."""
    target = ed.entries[r.edit_id]["target"]
    lines = [f"**Edit `{r.edit_id}` is active:** questions like this one now get {_quoted(target)} "
             f"(trained in {r.steps} steps, {r.seconds:.1f} s). {WHAT_HAPPENED[r.action]}".rstrip()]
    for old in r.superseded:
        lines.append(f"It **replaces** your earlier edit `{old}` of the same question "
                     f"({_quoted(ed.entries[old]['target'])}): that one is kept as superseded and "
                     f"comes back if you undo this one. **Active answer now:** {_quoted(target)}")
    if r.forgotten:
        lines.append(f"Earlier edits no longer reached: {', '.join(f'`{e}`' for e in r.forgotten)}.")
    if r.moved:
        lines.append(f"Earlier edits moved to clusters of their own (still active): {', '.join(f'`{e}`' for e in r.moved)}.")
    return "\n\n".join(lines)


@user_errors
def edit(pool: WorkspacePool, token: str, question: str, target: str, progress=gr.Progress()):
    """(summary, before/after, side effects, training plot)."""
    ed = pool.editor(token)
    progress(None, desc="waiting for the model")

    def report(step, loss):
        progress(None, desc=f"training step {step}, loss {loss:.3f} (stops once the answer is learnt)")

    try:
        pending = ed.train(question, target, progress=report)     # nothing written yet
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
    side = side_effects_html(r.edit_id, ed.side_effects(r.edit_id))    # keys only: milliseconds
    yield edit_summary(ed, r), gr.skip(), side, losses_figure(r.losses)
    yield gr.skip(), before_after_html(with_ellipsis(ed, ed.ask(question, compare_base=True))), gr.skip(), gr.skip()


@user_errors
def side_effects(pool: WorkspacePool, token: str, edit_id: str) -> str:
    """The side-effect check of an existing edit (History)."""
    if not edit_id:
        raise ValueError("choose an edit first")
    return side_effects_html(edit_id, pool.editor(token).side_effects(edit_id))


def probe_lines(text, kind: str) -> list[tuple[str, str]]:
    if text is not None and not isinstance(text, str):
        raise ValueError("the queries must be text, one per line")
    return [(kind, q.strip()) for q in (text or "").splitlines() if q.strip()]


@user_errors
def probe(pool: WorkspacePool, token: str, paraphrases: str, unrelated: str):
    """(summary, table, tab-separated copy, probes for the map)."""
    ed = pool.editor(token)
    items = probe_lines(paraphrases, "paraphrase") + probe_lines(unrelated, "unrelated")
    if not items:
        raise ValueError("type one or more queries, one per line")
    if len(items) > MAX_PROBES:
        raise ValueError(f"at most {MAX_PROBES} queries at once ({len(items)} given)")
    kinds, questions = [k for k, _ in items], [q for _, q in items]
    answers = [with_ellipsis(ed, a) for a in ed.probe(questions)]
    probes = [{"text": q, "key": ed.key(q).tolist(), "block": a.block, "cluster": a.cluster,
               "distance": a.distance, "radius": a.radius} for q, a in zip(questions, answers)]
    return (probe_summary(kinds, answers), probe_html(kinds, questions, answers),
            probe_tsv(kinds, questions, answers), probes)


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
    return history_html(ed), gr.update(choices=choices, value=None)


@user_errors
def delete(pool: WorkspacePool, token: str, edit_id: str) -> str:
    edit_id = (edit_id or "").strip() if isinstance(edit_id, str) else edit_id
    if not edit_id:
        raise ValueError("choose an edit to delete first")
    ed = pool.editor(token)
    prompt = ed.entries.get(edit_id, {}).get("prompt")
    back = ed.delete(edit_id)
    msg = f"Deleted edit `{edit_id}`: its block is freed."
    if back:
        msg += f" The earlier edit(s) it had replaced ({', '.join(f'`{e}`' for e in back)}) are active again."
    if prompt:      # say what its question gets now, from the routing (keys only)
        r = ed.route(prompt)
        msg += (f" Its question is now answered by edit `{r.edit_id}` (*{html.escape(ed.entries[r.edit_id]['target'])}*)."
                if r.block is not None else " Its question gets the original model's answer again.")
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
    pool.editor(token).reset(default_settings=True)
    return "The workspace is empty again (the model is the original) and the settings are back to their defaults."


BENCH_METHODS = ("melo", "grace", "lora")
BENCH_MAX_EDITS = 50
BENCH_COLUMNS = ["method", "edit success", "retention", "generality", "locality", "s / edit", "params / edit"]
# All four scores are teacher-forced token accuracy: the share of answer tokens the model
# predicts right given the tokens before them (the paper's measure), from 0 to 1.


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
                      xaxis_title="edits made", yaxis_title="retention (token accuracy)", yaxis_range=[0, 1.05],
                      xaxis=dict(tickmode="linear", tick0=0, dtick=max(1, len(curve) // 10)))   # whole edits only
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
