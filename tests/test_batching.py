"""Shared generations (melo_engine/batching.py): questions of several workspaces answered in
one batch get the answers each workspace gives on its own, its own edits included, and
nobody else's."""
from __future__ import annotations

import threading

from melo_engine import MeloConfig, MeloEditor
from melo_engine.batching import AnswerBatcher

FAST = MeloConfig(stop_loss=1.0, lr=1e-2, max_new_tokens=12)     # stop once the answer is exact


def test_three_workspaces_asking_at_once_share_batches_and_keep_their_own_answers(backbone, tmp_path):
    facts = [("What is the capital of Australia?", "Sydney"),
             ("Who wrote Hamlet?", "Goethe"),
             ("What colour is the sky on a clear day?", "Green")]
    eds = []
    for i, (q, t) in enumerate(facts):
        ed = MeloEditor.open(tmp_path / f"ws{i}", backbone=backbone, config=FAST)
        ed.edit(q, t)
        eds.append(ed)
    questions = [q for q, _ in facts] + ["What is the largest planet in the solar system?"]
    # What each workspace answers on its own, one question at a time.
    alone = {(i, q): eds[i].ask(q, compare_base=True) for i in range(3) for q in questions}

    batcher = AnswerBatcher(backbone, slots=1, max_rows=8)
    for ed in eds:
        ed.answers = batcher
    got: dict = {}
    gate = threading.Barrier(12)

    def asker(i, q):
        gate.wait()
        got[(i, q)] = eds[i].ask(q, compare_base=True)

    threads = [threading.Thread(target=asker, args=(i, q)) for i in range(3) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    for (i, q), a in alone.items():
        b = got[(i, q)]
        assert (b.text, b.base_text, b.block, b.edit_id) == (a.text, a.base_text, a.block, a.edit_id), (i, q)
    # Each workspace's fix is its own: workspace i answers fact i with its target, the others don't.
    for i, (q, t) in enumerate(facts):
        assert got[(i, q)].text.startswith(t)
        assert not any(got[(j, q)].text.startswith(t) for j in range(3) if j != i)
    # Twelve questions (plus the unedited twins of the three that fired) on one slot: shared.
    assert batcher.rows == 15 and batcher.batches < batcher.rows

    # The probe goes through the same batches and agrees with the ask.
    probed = eds[0].probe(questions)
    assert [(p.text, p.base_text) for p in probed] == [(alone[(0, q)].text, alone[(0, q)].base_text) for q in questions]
    for ed in eds:
        ed.close()


def test_the_batch_threads_sit_below_their_creator_the_express_lane_beside_it(backbone):
    import os

    def nice(tid):
        return os.getpriority(os.PRIO_PROCESS, tid)

    me = threading.get_native_id()
    before = nice(me)
    batcher = AnswerBatcher(backbone, slots=2, nice=3)
    try:
        assert [batcher.generate([]) for _ in range(2)] == [[], []]
        # The express lane (questions only) at the creator's priority, the other lowered.
        assert [nice(t.native_id) for t in batcher._threads] == [before, min(19, before + 3)]
        assert nice(me) == before           # the caller (the web server, the training) is not lowered
    finally:
        batcher.close()
    for t in batcher._threads:
        t.join(timeout=5)
        assert not t.is_alive()


def test_a_question_is_not_kept_behind_a_probe_of_many_rows(backbone):
    """With one answering thread taking one row at a time, a one-row question that arrives
    while a three-row call is being answered goes before that call's remaining rows."""
    import time

    from melo_engine.batching import Row

    batcher = AnswerBatcher(backbone, slots=1, max_rows=1)
    done: dict = {}

    def call(name, questions):
        rows = [Row(q, None, 16, True) for q in questions]
        batcher.generate(rows)
        done[name] = time.perf_counter()

    probe = threading.Thread(target=call, args=("probe", ["Who wrote Hamlet?", "What is the capital of Peru?",
                                                          "What is the largest ocean?"]))
    probe.start()
    time.sleep(0.3)                               # the probe's first row is generating
    call("question", ["Who painted the Mona Lisa?"])
    probe.join()
    batcher.close()
    assert done["question"] < done["probe"]
    assert batcher.batches == 4


def test_a_question_takes_the_express_lane_while_a_probe_fills_the_other(backbone):
    """Two answering threads and a probe of sixteen long rows: without an express lane both
    threads would take eight of them and a question would wait for one of those batches;
    with it, the question is answered before the probe is."""
    import time

    from melo_engine.batching import Row

    batcher = AnswerBatcher(backbone, slots=2, max_rows=8)
    done: dict = {}

    def call(name, questions, limit):
        batcher.generate([Row(q, None, limit, True) for q in questions])
        done[name] = time.perf_counter()

    probe = threading.Thread(target=call, args=("probe", [f"Tell me a long story about the number {i}." for i in range(16)],
                                                48))
    probe.start()
    time.sleep(0.5)                               # the probe's first batch is generating
    call("question", ["Who painted the Mona Lisa?"], 16)
    probe.join()
    batcher.close()
    assert done["question"] < done["probe"]
    assert batcher.rows == 17 and batcher.batches == 3      # the probe's rows: two batches, one after the other


def test_a_question_joins_the_express_lanes_running_generation_not_the_idle_lowered_thread(backbone):
    """The other threads never take a question (melo_engine/batching.py, "Express lanes"): a
    second question that arrives while the express lane answers a first one joins that
    generation at its next token (decoding.RunningBatch) and is answered at its own last
    token, long before the first's 48, by the express lane, though the other thread is idle."""
    import time

    from melo_engine.batching import Row

    batcher = AnswerBatcher(backbone, slots=2, max_rows=8)
    done: dict = {}

    def call(name, question, limit):
        done[name] = batcher.generate([Row(question, None, limit, True)]), time.perf_counter()

    first = threading.Thread(target=call, args=("first", "Tell me a long story about a lighthouse.", 48))
    first.start()
    time.sleep(0.5)                               # the express lane is generating it
    call("second", "Who painted the Mona Lisa?", 4)
    first.join()
    batcher.close()
    assert done["second"][1] < done["first"][1]
    assert batcher.served == [2, 0] and batcher.batches == 2
    # Each got what it gets alone: joining a running generation changes nobody's text.
    assert done["first"][0] == [backbone.generate("Tell me a long story about a lighthouse.", None, 48)]
    assert done["second"][0] == [backbone.generate("Who painted the Mona Lisa?", None, 4)]
