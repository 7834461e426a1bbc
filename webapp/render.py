"""What the page shows, as HTML and text: answers and which model gave them, before and
after, side effects, probe results and their summary, the history table. Plain functions
of engine results; callbacks.py calls them."""
from __future__ import annotations

import dataclasses
import difflib
import html
import re
import time
from dataclasses import dataclass

from melo_engine.sentences import sentence_spans

SIDE_EFFECT_ROWS = 10


@dataclass(frozen=True)
class Words:
    """How the page names a workspace's inputs and what it gives back: questions and
    answers, or (a classifier workspace) texts and labels."""

    item: str           # one input
    changed: str        # an input whose output is not the original's
    now: str            # the output column
    original: str       # what answers without the edits
    gets: str           # after an edit: inputs like this one ...
    reference: str      # the side-effect check's list
    reach: str          # an edit ... another input; what an input gets
    by: str             # an input is now ... by an edit


QUESTIONS = Words("question", "answered differently", "answer now", "original model",
                  "questions like this one now get", "reference questions", "answer", "answered")
TEXTS = Words("text", "labelled differently", "label now", "original classifier",
              "texts like this one are now labelled", "test texts of the classifier", "label", "labelled")


def words_for(ed) -> Words:
    """How the page names an editor's inputs and outputs."""
    from melo_engine.classifier.editor import ClassifierEditor

    return TEXTS if isinstance(ed, ClassifierEditor) else QUESTIONS
HISTORY_COLUMNS = ["id", "question", "answer", "status", "placed", "block", "made", "seconds"]

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


def with_ellipsis(ans):
    """An answer that ran to the length limit stops mid-sentence (the engine says which):
    mark it with an ellipsis."""
    def mark(text, cut):
        return text + " …" if text and cut else text
    return dataclasses.replace(ans, text=mark(ans.text, ans.truncated), base_text=mark(ans.base_text, ans.base_truncated))


def numbered_html(text: str) -> str:
    """The answer sentence by sentence, each with its number (what "Correct one sentence"
    refers to); the text between sentences is kept as it is."""
    spans = sentence_spans(text)
    if len(spans) < 2:
        return html.escape(text)
    out, at = [], 0
    for i, (a, b) in enumerate(spans, 1):
        out.append(html.escape(text[at:a]))
        out.append(f'<span class="melo-sentence"><span class="melo-num-badge">{i}</span>'
                   f'{html.escape(text[a:b])}</span>')
        at = b
    out.append(html.escape(text[at:]))
    return "".join(out)


def sentence_choices(text: str, width: int = 90, cut: bool = False) -> list[tuple[str, int]]:
    """The choices of "what to correct": the whole answer (0), or sentence 1, 2, ...; with
    `cut` (the answer ran to the length limit) the last one is said to be cut off, not
    offered as if it were a sentence the model finished."""
    spans = sentence_spans(text)
    out = [("The whole answer", 0)]
    for i, (a, b) in enumerate(spans, 1):
        s = text[a:b]
        note = " (cut off at the length limit)" if cut and i == len(spans) else ""
        out.append((f"Sentence {i}{note}: {s if len(s) <= width else s[:width - 1] + '…'}", i))
    return out if len(spans) > 1 else out[:1]


def answer_html(ans) -> str:
    return (f'<div class="melo-answer"><div class="melo-text">{numbered_html(ans.text)}</div>'
            f'<div class="melo-route">{routing_badge(ans.block, ans.distance, ans.radius)}'
            f' <span class="melo-time">answered in {ans.seconds:.2f} s</span></div></div>')


def before_after_html(ans, words: Words = QUESTIONS) -> str:
    """The question's answer without and with the edit, labelled."""
    after, before = diff_html(ans.text, ans.base_text or ans.text)
    return (f'<div class="melo-answer"><div class="melo-label">Before ({words.original})</div>'
            f'<div class="melo-text melo-before">{before}</div>'
            f'<div class="melo-label">After (with the edit)</div><div class="melo-text melo-after">{after}</div>'
            f'<div class="melo-route">{routing_badge(ans.block, ans.distance, ans.radius)}</div></div>')


def plain_reason(reason: str) -> str:
    """The verifier's reason in a class's words: "another slot: insect / spider (0.49)" says
    the two questions differ in the thing they ask about, and how alike those words are."""
    reason = re.sub(r"\((\d\.\d+)\)", r"(word similarity \1)", reason)
    return reason.replace("another slot: ", "it asks about something else: ")


def _neighbour_row(n) -> str:
    rejected = n.rejected
    itself = n.distance <= 1e-6
    verdict = ("<b>gets this edit</b>" + (" (the edited question itself)" if itself else
                                         " (the same question: as it should)" if n.same else
                                         " (another question: a side effect)" if n.same is False else "")
               if n.fires else
               f"answered by edit {html.escape(n.fired_edit)}" if n.fired_edit else
               f"stays original: within the radius, but not the same question "
               f"({html.escape(plain_reason(rejected))})" if rejected
               else "stays original (the same question: the fix does not reach it)" if n.same
               else "stays original")
    kind = ("melo-carried" if n.fires and n.same else "melo-fires" if n.fires else
            "melo-kept" if rejected else "melo-missed" if n.same else "")
    return (f'<tr class="{kind}"><td>{html.escape(n.question)}</td>'
            f'<td class="melo-num">{n.distance:.3f}</td><td class="melo-num">{n.radius:.3f}</td>'
            f'<td>{verdict}</td></tr>')


NEIGHBOUR_HEAD = "<thead><tr><th>question</th><th>distance</th><th>radius</th><th>now</th></tr></thead>"


def side_effects_verdict(neighbours, words: Words = QUESTIONS) -> str:
    """The check's summary lines. Where the bank knows the edited question's phrasings
    (Neighbour.same), the ones that get the fix are the fix carrying, not side effects, and
    the ones that do not are said too; the rest that get it are side effects; ones the bank
    cannot place are named as such, not guessed."""
    others = [n for n in neighbours if n.distance > 1e-6]          # the edited question itself aside
    carried = sum(1 for n in others if n.fires and n.same)
    missed = sum(1 for n in others if n.same and not n.fires and not n.fired_edit)
    wrong = sum(1 for n in others if n.fires and n.same is False)
    unknown = sum(1 for n in others if n.fires and n.same is None)
    known = any(n.same is not None for n in neighbours)
    lines = []
    if wrong:
        lines.append(("warn", f"This edit would also {words.reach} {wrong} other {_plural(wrong, words.item)} "
                              f"from the reference list: check {'them' if wrong > 1 else 'it'} in Probe."))
    if unknown:
        lines.append(("warn", f"It also fires for {unknown} {_plural(unknown, words.item)} the check cannot place: "
                              + (f"your {words.item} is not in the reference list, so its phrasings (which should "
                                 f"get the fix) cannot be told from other {words.item}s (which should not)"
                                 if not known else f"{'they are' if unknown > 1 else 'it is'} not in the reference "
                                 f"list, so whether {'they ask' if unknown > 1 else 'it asks'} the same as yours is "
                                 "for you to judge") + ". Check them in Probe."))
    if carried:
        lines.append(("ok", f"It carries to {carried} other {_plural(carried, 'phrasing')} of the same "
                            f"{words.item} in the list, as it should."))
    if missed:
        lines.append(("warn", f"{missed} {_plural(missed, 'phrasing')} of the same {words.item} in the list "
                              f"{'do' if missed > 1 else 'does'} not get it: the fix does not reach "
                              f"{'them' if missed > 1 else 'it'}."))
    if not wrong and not unknown:
        lines.append(("ok", f"No other {words.item} near this edit would get it."))
    if not carried and not missed and words is QUESTIONS:
        # Nothing to show the fix carrying: say so, rather than let "no other" read as "carries".
        lines.append(("note", ("No other phrasing of this question is near it in the list" if known
                               else "Your question is not in the reference list")
                      + ", so the check cannot show whether the fix carries to paraphrases: try some in Probe."))
    return "".join(f'<div class="melo-{kind}">{html.escape(text)}</div>' for kind, text in lines)


def side_effects_html(edit_id: str, neighbours, words: Words = QUESTIONS) -> str:
    """The reference questions nearest an edit: the ones it now fires for first and marked;
    beyond the first rows, the rest folded under "and N more" (opened with a click)."""
    table_head = NEIGHBOUR_HEAD.replace("<th>question</th>", f"<th>{words.item}</th>")
    shown, rest = neighbours[:SIDE_EFFECT_ROWS], neighbours[SIDE_EFFECT_ROWS:]
    more = (f'<details class="melo-more"><summary class="melo-same">and {len(rest)} more that get it</summary>'
            f'<table class="melo-probe">{table_head}<tbody>{"".join(map(_neighbour_row, rest))}</tbody>'
            '</table></details>' if rest else "")
    return (f'<div class="melo-side"><div class="melo-label">Side-effect check for edit {html.escape(edit_id)}: '
            f'{words.reference} nearest it (keys only, nothing generated)</div>{side_effects_verdict(neighbours, words)}'
            f'<table class="melo-probe">{table_head}<tbody>{"".join(map(_neighbour_row, shown))}</tbody>'
            f'</table>{more}</div>')


def _plural(n: int, word: str) -> str:
    return f"{word}{'s' if n != 1 else ''}"


def probe_summary(kinds: list[str], answers, words: Words = QUESTIONS) -> str:
    """'2 of 3 paraphrases got the fix; 0 of 3 unrelated questions fired a block' (Markdown).
    A block that fired counts even when its text came out the same as the original's."""
    para = [a for k, a in zip(kinds, answers) if k == "paraphrase"]
    other = [a for k, a in zip(kinds, answers) if k == "unrelated"]
    parts = []
    if para:
        got = sum(a.block is not None for a in para)
        parts.append(f"**{got} of {len(para)}** {_plural(len(para), 'paraphrase')} got the fix")
    if other:
        fired = sum(a.block is not None for a in other)
        changed = sum(a.text != a.base_text for a in other)
        parts.append(f"**{fired} of {len(other)}** unrelated {_plural(len(other), words.item)} fired a block"
                     + (f" (should be 0; {changed} of them {words.changed})" if fired else ""))
    return "; ".join(parts) + "."


def probe_html(kinds: list[str], questions: list[str], answers, words: Words = QUESTIONS) -> str:
    rows = []
    for kind, q, a in zip(kinds, questions, answers):
        edited, base = diff_html(a.text, a.base_text or "")
        same = "" if a.text != a.base_text else ' <span class="melo-same">(identical)</span>'
        rows.append(f"<tr><td>{html.escape(q)}</td><td>{kind}</td><td>{edited}</td><td>{base}{same}</td>"
                    f"<td>{routing_badge(a.block, a.distance, a.radius)}</td></tr>")
    return (f'<table class="melo-probe"><thead><tr><th>query</th><th>kind</th><th>{words.now}</th>'
            f'<th>{words.original}</th><th>what answered</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def probe_tsv(kinds: list[str], questions: list[str], answers, words: Words = QUESTIONS) -> str:
    """The results as tab-separated text, to paste into a spreadsheet."""
    def cell(x):
        return str(x).replace("\t", " ").replace("\n", " ")
    lines = [f"query\tkind\t{words.now}\t{words.original}\tfix applied\tblock\tdistance\tradius"]
    for kind, q, a in zip(kinds, questions, answers):
        lines.append("\t".join(cell(x) for x in (q, kind, a.text, a.base_text, "yes" if a.block is not None else "no",
                                                  "" if a.block is None else a.block,
                                                  "" if a.distance is None else f"{a.distance:.4f}",
                                                  "" if a.radius is None else f"{a.radius:.4f}")))
    return "\n".join(lines)


PLACED = {"new": "new", "beside": "beside", "joined": "joined", "superseded": "replaced",
          "conflict": "split", "bulk": "bulk"}
# One line per word, not one paragraph: a walkthrough found the paragraph too dense to read.
HISTORY_LEGEND = "".join(f"<li><b>{term}</b>: {text}</li>" for term, text in [
    ("new", "the first edit of a question like this one, in a cluster of its own"),
    ("beside", "a cluster of its own near an edit with another answer (where the two overlap, the nearer "
               "edit answers)"),
    ("joined", "the same question with the same answer as an earlier edit, in its cluster"),
    ("replaced", "the same question as earlier edits with another answer (or the same corrected sentence, "
                 "now ending the answer): this one answers now"),
    ("(c3)", "the cluster it is in now (an edit that comes back when the one that replaced it is undone is "
             "placed again, in a new cluster if none fits; its block stays its own)"),
    ("superseded", "(status) replaced by a later edit of the same question, kept, and active again if that "
                   "one is undone"),
    ("deleted", "(status) undone in this visit (shown until the page is reloaded)")])


def _placed(e: dict, edits: list[dict]) -> str:
    """How an edit was placed, in the legend's words, with its cluster."""
    action = PLACED.get(e.get("action", ""), e.get("action", ""))
    if e.get("action") == "superseded":
        replaced = [x for x in edits if x.get("superseded_by") == e["id"]]
        action += f" {', '.join(x['id'] for x in replaced)}" if replaced else " an earlier edit"
        # A sentence corrected again with the same text, to end the answer there: the answer
        # differs only in where it stops, which the text alone would not show.
        if replaced and all(x["target"] == e["target"] for x in replaced) and e.get("ends_answer"):
            action += ", the same sentence now ending the answer"
    return action + (f" ({e['cluster']})" if e.get("cluster") else "")


def _made(seconds_since_epoch) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds_since_epoch or 0))


def history_rows(edits: list[dict], deleted: list[dict] = ()) -> list[list]:
    """The table's rows, newest first: the workspace's edits, then the ones deleted in this
    visit (`deleted`: their records as they were)."""
    rows = []
    for e in reversed(edits):
        answer = e["target"] if "prefix" not in e else f"{e['target']} (one sentence; the text before it kept)"
        status = e["status"] + (f" by {e['superseded_by']}" if e.get("superseded_by") else "")
        rows.append([e["id"], e["prompt"], answer, status, _placed(e, edits),
                     "" if e.get("block") is None else e["block"], _made(e.get("created")),
                     f"{e.get('seconds', 0.0):.1f}"])
    for e in reversed(deleted):
        rows.append([e["id"], e["prompt"], e["target"], f"deleted at {time.strftime('%H:%M', time.localtime(e['deleted']))}",
                     "", "", _made(e.get("created")), f"{e.get('seconds', 0.0):.1f}"])
    return rows


def history_html(edits: list[dict], deleted: list[dict] = (), words: Words = QUESTIONS) -> str:
    rows = history_rows(edits, deleted)
    if not rows:
        return '<div class="melo-same">No edits yet.</div>'
    names = {"question": words.item, "answer": words.reach}
    head = "".join(f"<th>{names.get(c, c)}</th>" for c in HISTORY_COLUMNS)
    body = "".join(f'<tr class="{"melo-deleted" if str(r[3]).startswith("deleted") else ""}">'
                   + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return (f'<table class="melo-probe melo-history"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f'<div class="melo-legend"><b>placed</b> and <b>status</b>:<ul>{HISTORY_LEGEND}</ul></div>')


WHAT_HAPPENED = {"new": "It is the first edit of a question like this one.",
                 "beside": "It is the first edit of this question.",
                 "joined": "It joins an earlier edit of this question with the same answer.",
                 "superseded": "",
                 "conflict": "It split the cluster of an earlier edit with another answer."}


def _happened(action: str, words: Words) -> str:
    """WHAT_HAPPENED in the workspace's words (a text and its label, for a classifier)."""
    return WHAT_HAPPENED.get(action, "").replace("question", words.item).replace("answer", words.reach)


def _quoted(text: str) -> str:
    return f"“{html.escape(text)}”"


def _sentence_place(entry: dict) -> tuple[str, str] | None:
    """Where a sentence correction's sentence goes, and what follows it (None for a whole answer)."""
    if "prefix" not in entry:
        return None
    kept = len(sentence_spans(entry["prefix"]))
    where = ("as the first sentence" if not kept else "after the first sentence, kept word for word"
             if kept == 1 else f"after the first {kept} sentences, kept word for word")
    then = ("The answer ends there." if entry.get("ends_answer") else
            "What follows the corrected sentence is the model's own continuation and may change.")
    return f" {where}", f" {then}"


def _nearest_other(ed, question: str, cluster: str, words: Words) -> str:
    """Which edit with another answer is near a new one ("beside"), and how near: the
    circles overlap, and a question in both goes to the nearer edit."""
    near = next((d for d in ed.distances(question, n=3) if d["cluster"] != cluster), None)
    if near is None:
        return ""
    return (f"The nearest other edit, in cluster {near['cluster']} ({_quoted(_short_text(near['answer']))}), is "
            f"{near['distance']:.2f} away: its circle (radius {near['radius']:.2f}) and this one's overlap, and a "
            f"{words.item} inside both goes to the nearer edit (Index map shows them).")


def _short_text(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def edit_summary(ed, r, words: Words = QUESTIONS) -> str:
    """What the edit did, in words for a class: what is active now, and what it replaced."""
    entry = ed.record(r.edit_id)
    target = entry["target"]
    where, then = _sentence_place(entry) or ("", "")
    lines = [f"**Edit `{r.edit_id}` is active:** {words.gets} {_quoted(target)}{where} "
             f"(trained in {r.steps} steps, {r.seconds:.1f} s).{then} {_happened(r.action, words)}".rstrip()]
    if r.action == "beside":
        lines[0] += " " + _nearest_other(ed, entry["prompt"], r.cluster, words)
    for old in r.superseded:
        before = ed.record(old)
        # The same sentence again, now ending the answer: the texts alike, the ends not.
        again = (" It differs only in where the answer stops: this one ends it there."
                 if before["target"] == target and entry.get("ends_answer") and not before.get("ends_answer") else "")
        lines.append(f"It **replaces** your earlier edit `{old}` of the same question "
                     f"({_quoted(before['target'])}): that one is kept as superseded and "
                     f"comes back if you undo this one.{again} **Active {words.reach} now:** {_quoted(target)}")
    if r.forgotten:
        lines.append(f"Earlier edits no longer reached: {', '.join(f'`{e}`' for e in r.forgotten)}.")
    if r.moved:
        lines.append(f"Earlier edits moved to clusters of their own (still active): {', '.join(f'`{e}`' for e in r.moved)}.")
    return "\n\n".join(lines)


def import_summary(report) -> str:
    """What an import did: new edits, edits already here (skipped), earlier edits replaced."""
    def n(count: int, what: str) -> str:
        return f"{count} {what}{'' if count == 1 else 's'}"
    parts = [f"Imported {n(len(report.added), 'new edit')}."]
    if report.skipped:
        parts.append(f"Skipped {n(len(report.skipped), 'edit')} already in this workspace.")
    if report.superseded:
        parts.append(f"{n(len(report.superseded), 'earlier edit')} of the same question replaced (undo the new one "
                     f"to bring it back).")
    return " ".join(parts)


def label_answer(c):
    """A classifier's reading of a text (classifier/editor.Classified) as the page shows an
    answer: the label is its text, the unedited classifier's label its original."""
    from melo_engine.records import Answer

    return Answer(c.label, c.block, c.distance, c.radius, c.cluster, c.edit_id, c.base_label, c.seconds, key=c.key)


def classified_html(c) -> str:
    """The label a text gets now, with which model gave it (the bars are in the chart)."""
    return answer_html(label_answer(c))


def label_before_after_html(c) -> str:
    """A text's label without and with the edits."""
    return before_after_html(label_answer(c), TEXTS)
