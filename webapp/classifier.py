"""Callbacks of a classifier workspace (melo_engine/classifier): a text, the label it gets
with each label's probability, the right label picked from a list, Apply edit.

The page has both Edit panels and shows the one of the visitor's workspace kind (`panels`).
Everything else (Probe, the map, History, side effects, export and import) is the question
workspace's, worded for texts and labels (render.TEXTS). Thin over the engine, like
callbacks.py.
"""
from __future__ import annotations

import gradio as gr

from melo_engine.classifier.editor import ClassifierEditor

from . import plots, render
from .callbacks import FormRefused, notices, trained, user_errors
from .sessions import WorkspacePool

EDIT_OUTPUTS = 6     # summary, label before/after, the bars, side effects, training plot, the button


def classifier_of(ed) -> ClassifierEditor:
    """The workspace's editor if it classifies; otherwise one line saying how to get one."""
    if not isinstance(ed, ClassifierEditor):
        raise ValueError("this workspace answers questions: a classifier workspace is chosen under Settings, "
                         "Model, while the workspace has no edits")
    return ed


# The Probe boxes and the Index map's distance box: (label, placeholder) by kind.
BOXES = {
    render.QUESTIONS: (("Paraphrases (should get the fix)", "Which planet is the biggest in our solar system?"),
                       ("Unrelated questions (should stay exactly the same)", "What is the capital of France?"),
                       ("True distances for a question", "Which planet is the biggest in our solar system?")),
    render.TEXTS: (("Texts like the edited one (should get its label)", "a small songbird of the finch family"),
                   ("Unrelated texts (should keep their label exactly)", "a building where a king lives"),
                   ("True distances for a text", "a small songbird of the finch family")),
}


def panels(pool: WorkspacePool, token: str):
    """What the Edit tab and the Probe boxes show for the visitor's workspace kind: (the
    question panel, the classifier panel, the label list, the example texts, the two probe
    boxes, the map's distance box)."""
    try:
        ed = pool.reader(token)
    except ValueError:
        return (gr.skip(),) * 7
    kind = render.words_for(ed)
    boxes = [gr.update(label=label, placeholder=hint) for label, hint in BOXES[kind]]
    if kind is render.QUESTIONS:
        return gr.update(visible=True), gr.update(visible=False), gr.skip(), gr.skip(), *boxes
    return (gr.update(visible=False), gr.update(visible=True), gr.update(choices=ed.labels, value=None),
            gr.Dataset(samples=[[e["text"], e["label"]] for e in ed.examples()]), *boxes)


@notices
def classify(pool: WorkspacePool, token: str, text: str):
    """(the label now and which model gave it, each label's probability as bars)."""
    c = classifier_of(pool.reader(token)).classify(text, compare_base=True)
    return render.classified_html(c), plots.label_bars(c)


def example(sample):
    """An example clicked: its text and its right label into the boxes."""
    text, label = (list(sample) + ["", ""])[:2]
    return text, label


@user_errors
def edit(pool: WorkspacePool, token: str, text: str, label: str, progress=gr.Progress()):
    """(summary, label before/after, the bars, side effects, training plot, the button)."""
    try:
        with pool.writing(token) as ed:
            yield from _edit(classifier_of(ed), text, label, progress)
    except FormRefused as err:
        gr.Warning(str(err))        # the panels keep what they showed


def _edit(ed: ClassifierEditor, text: str, label: str, progress):
    def train(report):
        if not label:
            raise ValueError("pick the right label from the list first")
        return ed.train(text, label, progress=report)

    pending = yield from trained(EDIT_OUTPUTS, train, progress, "label")
    r = ed.commit(pending)
    c = ed.classify(text, compare_base=True)
    yield (render.edit_summary(ed, r, render.TEXTS), render.label_before_after_html(c), plots.label_bars(c),
           render.side_effects_html(r.edit_id, ed.side_effects(r.edit_id), render.TEXTS),
           plots.losses_figure(r.losses), gr.skip())
