"""The MELO Studio page, top to bottom, and its API endpoints."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import gradio as gr

from melo_engine.registry import KEY_SOURCES, METHODS

from . import api
from . import callbacks as cb
from . import classifier as clsf
from . import published
from .downloads import ROUTE, Downloads
from .guards import UploadedFilesOnly
from .sessions import WorkspacePool
from .tokens import TokenCookie

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The largest upload (launch's max_file_size): a .melo export of 50 edits fits with room
# (test_crowd.py measures a block), a crowd's 20 MB posts do not.
MAX_UPLOAD_MB = 12

ABOUT = """
**MELO** (Zhou, Yu, He and Chen, *MELO: Enhancing Model Editing with Neuron-Indexed Dynamic LoRA*,
AAAI 2024, [arXiv:2312.11795](https://arxiv.org/abs/2312.11795)) changes what a frozen language
model answers without retraining it. Every edit trains its own small LoRA *block* (about
50,000 numbers added to the top layers of the model) and leaves every earlier block alone. A
vector index remembers, for each edit, a *key* of its question, grouped into clusters with a
radius. A new question fires the block of the nearest edit only when its key falls inside that
cluster's radius; otherwise no block fires and the model answers exactly as before. This is why
a fix can carry over to paraphrases while unrelated answers stay the same: the *Index map* shows
where each edit sits and which queries reached it. When you edit a question again with another
answer, the newer edit wins for every phrasing and the older one waits, superseded, until the
newer is undone.

A long answer with one wrong sentence can be fixed in place (the paper's third task,
hallucination correction): the block learns to say the answer's sentences before the wrong
one exactly as they were, then the corrected sentence.
"""



def key_source_help() -> str:
    """The Settings help of the key source: every registered source in its own words, with the
    key study's figures where docs/results has them."""
    def one(name, source):
        what = "" if source.summary.lower() in source.title.lower() else f": {source.summary}"
        return f"{source.title}{what}. {published.key_figures(name, getattr(source, 'default_whitened', False))}"
    each = " ".join(one(name, source).strip() for name, source in KEY_SOURCES.items())
    return f"What a question's key is computed from. {each} Can change only while the workspace has no edits."


HELP = {
    "model": "The model your workspace edits. Each loads once on this server, on its first use, and is then "
             "shared by every workspace on it. Can change only while the workspace has no edits.",
    "radius": "How far (in key distance) a question may be from an edit and still fire its block. "
              "Key distances run from 0 (the same question) to 2 (opposite); the default is calibrated "
              "halfway between how far rewordings of one question spread and how near questions about "
              "other subjects come. "
              "Larger: more paraphrases fixed, more risk of touching unrelated questions (the side-effect "
              "check after each edit shows which). In completion mode it is calibrated on passages instead: "
              "half the distance from one sentence of a text to the next.",
    "rank": "Size of each edit's LoRA block. Larger blocks learn harder edits but store more numbers.",
    "lr": "Step size of the optimiser that trains a block. Too high may overshoot; too low needs more steps.",
    "iters": "Most training steps per edit; training stops earlier once the answer is reproduced.",
    "prompt_mode": "Chat: your text is a user's turn in the model's chat template and the answer ends the turn. "
                   "Completion: your text is plain text the model continues (for base models, and for "
                   "passages as in the paper's hallucination task). Can change only while the workspace has no edits.",
}


def build_demo(pool: WorkspacePool, downloads: Downloads, answer_concurrency: int | None = None) -> gr.Blocks:
    """The page. `downloads` hands out exports (serve `downloads.endpoint` at downloads.ROUTE,
    see `server_extras`); `answer_concurrency`: questions answered at once (default: the pool's)."""
    examples = json.loads((ASSETS / "example_edits.json").read_text())
    bind = lambda fn: partial(fn, pool)  # noqa: E731 - every callback gets the pool first

    # Uploads (a .melo import) leave gradio's cache within the hour.
    with gr.Blocks(title="MELO Studio", delete_cache=(600, 3600)) as demo:
        token = gr.BrowserState("", storage_key="melo-studio-workspace")
        probes_state = gr.State([])
        deleted = gr.State([])          # the edits deleted in this visit, for History
        shown = gr.State(None)          # the question last answered and its answer (for a sentence correction)
        gr.Markdown("# MELO Studio\nFix a wrong answer of a language model, then check where the fix applies.")

        with gr.Tab("Edit", id="edit"):
            # Both kinds of workspace have their panel; the visitor's kind is shown
            # (classifier.panels, on load and when Settings changes the model).
            with gr.Column(elem_id="question-panel") as question_panel:
                with gr.Row():
                    with gr.Column(scale=3):
                        question = gr.Textbox(label="Question", placeholder="Ask the model something…", lines=2,
                                              elem_id="question")
                        ask_btn = gr.Button("Ask the model", elem_id="ask-btn")
                        answer = gr.HTML(elem_id="answer")
                        wrong = gr.Radio([("The whole answer", 0)], value=0, label="What to correct",
                                         info="A long answer with one wrong sentence: pick that sentence, fix it "
                                              "below; the sentences before it stay word for word.",
                                         elem_id="wrong-sentence")
                        target = gr.Textbox(label="Correct answer", placeholder="What the model should say…", lines=2,
                                            elem_id="target")
                        end_here = gr.Checkbox(label="End the answer after the corrected sentence (otherwise the model "
                                                     "goes on in its own words, which may change)",
                                               visible=False, elem_id="end-here")
                        edit_btn = gr.Button(cb.APPLY, variant="primary", elem_id="edit-btn")
                    with gr.Column(scale=2):
                        # Tall enough to show a waiting visitor their place in the queue.
                        edit_summary = gr.Markdown(elem_id="edit-summary", min_height=72)
                        after = gr.HTML(elem_id="after")
                        side_html = gr.HTML(elem_id="side-effects")
                        loss_plot = gr.Plot(label="Training", elem_id="loss-plot")
                gr.Examples([[e["prompt"], e["target"]] for e in examples], inputs=[question, target],
                            label="Examples: click one to fill both boxes, then ask to see what the model says now")
            with gr.Column(visible=False, elem_id="classifier-panel") as classifier_panel:
                with gr.Row():
                    with gr.Column(scale=3):
                        cls_text = gr.Textbox(label="Text", lines=3, elem_id="cls-text",
                                              placeholder="A definition to label: what kind of thing does it describe?")
                        classify_btn = gr.Button("Classify", elem_id="classify-btn")
                        cls_answer = gr.HTML(elem_id="cls-answer")
                        cls_bars = gr.Plot(label="Probability of each label", elem_id="cls-bars")
                        cls_label = gr.Dropdown(choices=[], label="The right label", elem_id="cls-label",
                                                info="Pick the label this text should get, then apply the edit.")
                        cls_edit_btn = gr.Button(cb.APPLY, variant="primary", elem_id="cls-edit-btn")
                    with gr.Column(scale=2):
                        cls_summary = gr.Markdown(elem_id="cls-summary", min_height=72)
                        cls_side = gr.HTML(elem_id="cls-side-effects")
                        cls_loss = gr.Plot(label="Training", elem_id="cls-loss-plot")
                # The label column shows as text (a dropdown's example shows only values it
                # knew when the page was built); a click puts it into the dropdown.
                cls_examples = gr.Dataset(components=[cls_text, gr.Textbox(label="The right label", render=False)],
                                          samples=[], type="values", samples_per_page=12,
                                          label="Examples: texts the classifier labels wrong; click one to fill "
                                                "both boxes and see what it says now", elem_id="cls-examples")

        with gr.Tab("Probe", id="probe"):
            gr.Markdown("Does the fix hold for other wordings, and do other answers stay as they were? "
                        "One query per line; each is answered with your edits and by the original model.")
            with gr.Row():
                probe_text = gr.Textbox(label="Paraphrases (should get the fix)", lines=4, elem_id="probe-text",
                                        placeholder="Which planet is the biggest in our solar system?")
                probe_other = gr.Textbox(label="Unrelated questions (should stay exactly the same)", lines=4,
                                         elem_id="probe-other", placeholder="What is the capital of France?")
            probe_btn = gr.Button("Probe", variant="primary", elem_id="probe-btn")
            probe_sum = gr.Markdown(elem_id="probe-summary")
            probe_out = gr.HTML(elem_id="probe-out")
            with gr.Accordion("Copy the results (tab-separated, for a spreadsheet)", open=False):
                probe_copy = gr.Textbox(show_label=False, lines=4, buttons=["copy"], elem_id="probe-copy")

        with gr.Tab("Index map", id="map"):
            with gr.Row():
                with gr.Column(scale=3):
                    map_plot = gr.Plot(label="Index map (a 2-D projection)", elem_id="index-map")
                    refresh_btn = gr.Button("Refresh", size="sm")
                with gr.Column(scale=2):
                    dist_q = gr.Textbox(label="True distances for a question", elem_id="dist-question",
                                        placeholder="Which planet is the biggest in our solar system?")
                    dist_btn = gr.Button("Show distances", size="sm", elem_id="dist-btn")
                    dist_plot = gr.Plot(label="Distances to the nearest clusters", elem_id="dist-plot")

        with gr.Tab("History", id="history"):
            table = gr.HTML(elem_id="history")
            with gr.Row():
                selected = gr.Dropdown(label="Choose an edit (to undo it or check its side effects)", choices=[],
                                       elem_id="selected-id", scale=2)
                delete_btn = gr.Button("Delete (undo) this edit", variant="stop", elem_id="delete-btn")
            history_msg = gr.Markdown(elem_id="history-msg")
            side_btn = gr.Button("Which reference questions would get this edit?", size="sm", elem_id="side-btn")
            side_history = gr.HTML(elem_id="side-effects-history")
            with gr.Row():
                export_btn = gr.Button("Export all edits", elem_id="export-btn")
                export_link = gr.HTML(elem_id="export-link")
                import_file = gr.File(label="Import a .melo file", file_types=[".melo"], elem_id="import-file")

        with gr.Tab("Settings", id="settings"):
            with gr.Row():
                model = gr.Radio(cb.model_choices(pool), label="Model", info=HELP["model"], elem_id="model-choice",
                                 scale=2, interactive=False)
                model_note = gr.Markdown(elem_id="model-note")
            model_msg = gr.Markdown(elem_id="model-msg")
            key_source = gr.Radio(cb.key_sources(), label="Key source", info=key_source_help(), elem_id="key-source",
                                  interactive=False)
            key_msg = gr.Markdown(elem_id="key-msg")
            prompt_mode = gr.Radio([("Chat (a question, answered in a chat turn)", "chat"),
                                    ("Completion (plain text the model continues)", "completion")],
                                   label="Prompt mode", info=HELP["prompt_mode"], elem_id="prompt-mode",
                                   interactive=False)
            mode_msg = gr.Markdown(elem_id="mode-msg")
            gr.Markdown("These apply to **new** edits; existing edits keep what they were trained with.")
            radius = gr.Number(label="Radius", info=HELP["radius"], precision=4, minimum=1e-4, elem_id="radius",
                               interactive=False)
            rank = gr.Slider(1, 16, step=1, label="Rank per block", info=HELP["rank"], interactive=False)
            lr = gr.Number(label="Learning rate", info=HELP["lr"], minimum=1e-5, maximum=1.0, interactive=False)
            iters = gr.Slider(1, 200, step=1, label="Max iterations", info=HELP["iters"], interactive=False)
            save_btn = gr.Button("Save settings", interactive=False, elem_id="save-settings")
            settings_msg = gr.Markdown()
            gr.Markdown("**Your own questions.** Every side-effect check of your workspace also runs over a "
                        "question list you load here (an eval set, your class's questions: thousands are fine). "
                        "The list is yours: other visitors' checks do not see it. A list for every workspace on "
                        "this server is loaded from the shell by whoever runs it (README, \"Your own questions\"). "
                        "Keys are computed once, when the file is loaded: large files take minutes.")
            with gr.Row():
                probe_file = gr.File(label="Load questions (.txt one per line, .json or .csv)",
                                     file_types=[".txt", ".json", ".csv"], elem_id="probe-file")
                probe_msg = gr.Markdown(elem_id="probe-msg")
            with gr.Row():
                confirm = gr.Checkbox(label="Yes, remove every edit in my workspace and restore the default settings", elem_id="reset-confirm")
                reset_btn = gr.Button("Reset workspace", variant="stop", elem_id="reset-btn")

        with gr.Tab("Benchmark", id="benchmark"):
            gr.Markdown(
                "Sequential zsRE edits (the MELO paper's protocol: every phrasing of a fact labelled with its "
                "true answer, shuffled; generality on held-out phrasings of the edited facts), the same questions "
                "in the same order, made with **MELO**, with **GRACE** (a codebook of replacement activations) and "
                "with one **plain LoRA** adapter trained on every edit in turn. *Retention*: earlier edits still "
                "hold; *generality*: held-out phrasings get the new answer; *locality*: unrelated questions get "
                "the original answer. Scores are the share of answer tokens the model gets right given the "
                "tokens before them (teacher-forced token accuracy, as in the paper). A run takes a process "
                "of its own at low priority, so nobody's edits or questions wait for it; one run at a time "
                "per visitor, and a run waits while another visitor's is under way. 20 edits take a few "
                "minutes; Stop ends it at once.")
            runs = published.benchmark_runs()
            with gr.Accordion("Published results (measured on the project's machine, docs/results)",
                              open=True, visible=bool(runs)):
                run_pick = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run",
                                       elem_id="published-run")
                run_caption = gr.Markdown(elem_id="published-caption")
                run_table = gr.Dataframe(headers=published.COLUMNS, interactive=False, elem_id="published-table")
                run_plot = gr.Plot(label="Retention", elem_id="published-plot")
            gr.Markdown("### Run one yourself")
            with gr.Row():
                bench_n = gr.Number(value=20, precision=0, minimum=1, maximum=cb.BENCH_MAX_EDITS,
                                    label="Edits per method", elem_id="bench-n")
                bench_methods = gr.CheckboxGroup(METHODS.names(), value=METHODS.names(),
                                                 label="Methods", elem_id="bench-methods")
            with gr.Row():
                bench_btn = gr.Button("Run benchmark", variant="primary", elem_id="bench-btn")
                bench_stop = gr.Button("Stop", variant="stop", elem_id="bench-stop")
            bench_status = gr.Markdown(elem_id="bench-status", min_height=72)   # room for the queue place
            bench_table = gr.Dataframe(headers=published.COLUMNS, interactive=False, elem_id="bench-table")
            bench_plot = gr.Plot(label="Retention", elem_id="bench-plot")

        with gr.Tab("About", id="about"):
            gr.Markdown(ABOUT)
            key_about = gr.Markdown(elem_id="key-about")

        # ---- wiring ----------------------------------------------------------------------
        private = dict(api_visibility="private")
        # Drawn disabled; each is enabled once it shows the visitor's own value (cb.settings_values).
        settings_shown = [model, key_source, prompt_mode, radius, rank, lr, iters, save_btn]
        refresh_all = [(bind(cb.history), [token, deleted], [table, selected]),
                       (bind(cb.index_map), [token, probes_state], map_plot)]

        def after_change(event):
            """Refresh the table, then the map (slower), without holding up the first result."""
            for fn, ins, out in refresh_all:
                event = event.then(fn, ins, out, **private)
            return event

        # The Edit panel, the Probe boxes and the map's box of the visitor's kind of workspace.
        kind_shown = [question_panel, classifier_panel, cls_label, cls_examples, probe_text, probe_other, dist_q]
        loaded = demo.load(bind(cb.visitor_token), token, token, **private).then(
            bind(cb.settings_values), token, settings_shown, **private).then(
            bind(cb.key_info), token, key_about, **private).then(bind(cb.model_note), None, model_note, **private).then(
            bind(clsf.panels), token, kind_shown, **private)
        after_change(loaded).then(cb.published_run, run_pick, [run_caption, run_table, run_plot], **private)

        # Everything that generates shares one queue, wide enough to fill the shared batches
        # (pool.answer_concurrency: melo_engine/batching.py bounds the generations at once to
        # the cores); edits queue beside it, as many at once as the pool has training
        # workers. docs/BENCHMARKS.md, "A class on one server".
        answer_q = {"concurrency_limit": answer_concurrency or pool.answer_concurrency, "concurrency_id": "answer"}
        # (A front of the Ray engine, cluster.RayPool, trains one edit per replica at once.)
        train_q = {"concurrency_limit": pool.train_concurrency, "concurrency_id": "train"}
        for ask_event in (ask_btn.click, question.submit):
            ask_event(bind(cb.ask), [token, question], [answer, shown, wrong, end_here], **answer_q, **private)
        # On change, not input: a new answer (an ask, an edit) sets the choice back to the whole
        # answer, and the box must then say so too (it kept "Corrected sentence 2").
        wrong.change(cb.pick_sentence, [wrong, shown], [target, end_here], **private)
        # The button says the edit waits (its place in the queue shows above the result) until
        # training starts, then that it trains; it is back once the edit is done or refused.
        waiting = edit_btn.click(lambda: gr.update(value=cb.WAITING, interactive=False), None, edit_btn,
                                 queue=False, trigger_mode="once", **private)
        trained = waiting.then(bind(cb.edit), [token, question, target, wrong, shown, end_here],
                               [edit_summary, after, side_html, loss_plot, answer, shown, wrong, end_here, edit_btn],
                               show_progress_on=[edit_summary], **train_q, **private)
        trained.then(lambda: gr.update(value=cb.APPLY, interactive=True), None, edit_btn, queue=False, **private)
        after_change(trained.success(lambda: None, None, None, **private))
        # A classifier workspace: classify a text (or an example, one click), pick the label, apply.
        classify_btn.click(bind(clsf.classify), [token, cls_text], [cls_answer, cls_bars], **answer_q, **private)
        cls_examples.click(clsf.example, cls_examples, [cls_text, cls_label], queue=False, **private).then(
            bind(clsf.classify), [token, cls_text], [cls_answer, cls_bars], **answer_q, **private)
        cls_waiting = cls_edit_btn.click(lambda: gr.update(value=cb.WAITING, interactive=False), None, cls_edit_btn,
                                         queue=False, trigger_mode="once", **private)
        cls_trained = cls_waiting.then(bind(clsf.edit), [token, cls_text, cls_label],
                                       [cls_summary, cls_answer, cls_bars, cls_side, cls_loss, cls_edit_btn],
                                       show_progress_on=[cls_summary], **train_q, **private)
        cls_trained.then(lambda: gr.update(value=cb.APPLY, interactive=True), None, cls_edit_btn, queue=False,
                         **private)
        after_change(cls_trained.success(lambda: None, None, None, **private))
        probe_ev = probe_btn.click(bind(cb.probe), [token, probe_text, probe_other],
                                   [probe_sum, probe_out, probe_copy, probes_state],
                                   show_progress_on=[probe_sum], **answer_q, **private)
        probe_ev.success(bind(cb.index_map), [token, probes_state], map_plot, **private)
        refresh_btn.click(bind(cb.index_map), [token, probes_state], map_plot, **private)
        for dist_event in (dist_btn.click, dist_q.submit):
            dist_event(bind(cb.distances), [token, dist_q], dist_plot, **private)
        # One benchmark per visitor at a time: the lane is claimed (a second claim is refused
        # in one line) before the run starts, and the run refuses without a claim. Runs wait
        # for the lane in the lane (lane.py: one at a time, each in its own low-priority
        # process, page and API runs in one line), never in the edits' queue.
        # The claim is queued (unlimited, so it never waits) because only a queued event shows
        # its refusal to the page; not queued, "already queued or running" reached only the log.
        bench_btn.click(bind(cb.claim_benchmark), token, bench_status, trigger_mode="once",
                                    concurrency_limit=None, show_progress="hidden", **private).success(
            bind(cb.run_benchmark), [token, bench_n, bench_methods], [bench_status, bench_table, bench_plot],
            show_progress="hidden", concurrency_limit=None, **private)
        # Stop tells the lane, which ends the run quietly wherever it is (cancelling the event
        # instead left a bare "Error" on the page, now and then).
        bench_stop.click(bind(cb.stop_benchmark), token, bench_status, queue=False, **private)
        run_pick.input(cb.published_run, run_pick, [run_caption, run_table, run_plot], **private)

        after_change(delete_btn.click(bind(cb.delete), [token, selected, deleted],
                                      [history_msg, deleted, side_history],
                                      **private))
        side_btn.click(bind(cb.side_effects), [token, selected], side_history, **private)
        def export(token_value: str, request: gr.Request):
            return cb.export(pool, downloads, token_value, request)     # gradio passes the request by its hint

        export_btn.click(export, token, export_link, **private)
        # The last message goes first: an error must not sit beside an earlier "Imported ...".
        # The box is emptied afterwards, ready for the next file.
        after_change(import_file.upload(cb.clear, None, history_msg, queue=False, **private).then(
            bind(cb.import_file), [token, import_file], history_msg, **private)).then(
            lambda: None, None, import_file, queue=False, **private)
        save_btn.click(bind(cb.save_settings), [token, radius, rank, lr, iters], settings_msg, **private)
        # Keying a large file takes minutes: its own queue, never ahead of anyone's edit.
        probe_file.upload(cb.clear, None, probe_msg, queue=False, **private).then(
            bind(cb.load_probes), [token, probe_file], probe_msg, concurrency_limit=1, concurrency_id="probes",
            **private).then(lambda: None, None, probe_file, queue=False, **private)
        key_source.input(bind(cb.set_key_source), [token, key_source], [key_msg, radius, key_source],
                         **private).then(bind(cb.key_info), token, key_about, **private)
        # A first use of a model loads it (seconds; a first conversion, a minute): its message shows the wait.
        model.input(cb.clear, None, model_msg, queue=False, **private).then(
            bind(cb.set_model), [token, model], [model_msg, model], show_progress_on=[model_msg], **private).then(
            bind(cb.settings_values), token, settings_shown,
            **private).then(bind(cb.key_info), token, key_about, **private).then(
            bind(cb.model_note), None, model_note, **private).then(bind(clsf.panels), token, kind_shown, **private)
        prompt_mode.input(bind(cb.set_prompt_mode), [token, prompt_mode], [mode_msg, radius, prompt_mode], **private)
        # A reset empties every panel that showed the old edits and puts the settings back.
        cleared = [answer, edit_summary, after, side_html, loss_plot, probe_sum, probe_out, probe_copy,
                   history_msg, side_history, export_link, key_msg, mode_msg, model_msg, dist_plot, shown,
                   cls_answer, cls_bars, cls_summary, cls_side, cls_loss]
        after_change(reset_btn.click(bind(cb.reset), [token, confirm], settings_msg, **private).success(
            lambda: (False, [], [], gr.update(choices=[("The whole answer", 0)], value=0),
                     gr.update(value=False, visible=False)) + (None,) * len(cleared),
            None, [confirm, probes_state, deleted, wrong, end_here, *cleared], **private).then(
            bind(cb.settings_values), token, settings_shown, **private).then(
            bind(clsf.panels), token, kind_shown, **private))

        api.register(pool, answer_q, train_q)
    return demo


def server_extras(pool: WorkspacePool, downloads: Downloads) -> dict:
    """What the server adds to gradio's app (launch's `app_kwargs`): the API's token cookie,
    a door that refuses event data naming a file nobody uploaded (guards.py), the one-time
    export downloads, and a plain 404 for an API name or an event index that
    does not exist (gradio answers them with a 500 and a traceback in the log)."""
    from gradio.route_utils import FnIndexInferError
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def unknown_endpoint(request, exc):
        return JSONResponse({"error": f"no such API endpoint; this app has {', '.join(api.NAMES)}"},
                            status_code=404)

    def unknown_event(request, exc):
        """A queue join with an event index the page does not have (gradio looks it up
        unchecked); any other KeyError stays the server's error it is."""
        if not request.url.path.endswith("/queue/join"):
            raise exc
        return JSONResponse({"error": "no such event on this page"}, status_code=404)

    return {"middleware": [Middleware(TokenCookie, tokens=pool.tokens), Middleware(UploadedFilesOnly)],
            "routes": [Route(ROUTE, downloads.endpoint, methods=["GET"])],
            "exception_handlers": {FnIndexInferError: unknown_endpoint, KeyError: unknown_event}}
