"""The paper's hallucination task: wrong sentences of long-form passages corrected in
place, measured by perplexity (MELO_SPEC section 5).

A passage is a list of sentences, each marked accurate, inaccurate or unchecked. Every
inaccurate sentence j is an edit: prompt = "This is a Wikipedia passage about {name}."
followed by the passage's sentences before j (as written, wrong ones included), target =
the correct sentence. Accurate sentences, with the same kind of prompt, make the ARR set
(edits must not harm what was right); unrelated passages make the locality set.

Two sources of passages:
- `from_selfcheck(FILE)`: the public WikiBio hallucination set of the SelfCheckGPT authors,
  read from its own fields (`gpt3_sentences`, `annotation`, `wiki_bio_text`), for a
  researcher who has the file. The correct sentence j is sentence j of the Wikipedia text
  (the last one when the text is shorter), as in the paper's code.
- `standin()`: built here from bundled material (`build_standin`, shipped as
  assets/hallucination_standin.json), because that set cannot be fetched on these machines.
  See docs/BENCHMARKS.md, "Hallucination", for how it is made and how it differs.
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from melo_engine.refdata import passage_header as header
from melo_engine.sentences import split_sentences

from .base import Benchmark, json_checkpoint, melo_settings, method_names
from .data import DATA, ROOT, counterfact_records
from .machine import machine

STANDIN = ROOT / "assets" / "hallucination_standin.json"
CALIBRATION = ROOT / "assets" / "calibration_passages.json"
LOCALITY = ROOT / "assets" / "locality_passages.json"
PAPER = {"model": "GPT2-XL", "edits": 1000,   # MELO paper, Table 2
         "melo": {"edit_ppl": 1.04, "arr_ppl": 2.66, "locality_ppl": 17.45},
         "grace": {"edit_ppl": 7.14, "arr_ppl": 10.00, "locality_ppl": 15.84},
         "lora": {"edit_ppl": 2187.6, "arr_ppl": 1817.3, "locality_ppl": 2578.5}}




@dataclass
class Sentence:
    prompt: str        # the header and the passage's sentences before this one
    target: str        # the correct sentence (an edit) or the accurate sentence (ARR)
    passage: int


@dataclass
class HallucinationSet:
    name: str
    edits: list[Sentence]
    accurate: list[Sentence]
    locality: list[str]
    notes: dict = field(default_factory=dict)


def from_passages(name: str, passages: list[dict], locality: list[str], notes: dict | None = None) -> HallucinationSet:
    """Edits and accurate sentences of passages {"name", "sentences", "annotation",
    "corrections"}: annotation[j] "accurate", "...inaccurate" (an edit toward
    corrections[j]) or anything else (context only)."""
    edits, accurate = [], []
    for i, p in enumerate(passages):
        for j, (sentence, mark) in enumerate(zip(p["sentences"], p["annotation"])):
            prompt = " ".join([header(p["name"])] + list(p["sentences"][:j]))
            if "inaccurate" in mark:
                edits.append(Sentence(prompt, p["corrections"][j], i))
            elif mark == "accurate":
                accurate.append(Sentence(prompt, sentence, i))
    return HallucinationSet(name, edits, accurate, locality,
                            dict(notes or {}, passages=len(passages), edits=len(edits), accurate=len(accurate),
                                 locality_passages=len(locality)))


def bundled_locality() -> list[str]:
    return json.loads(LOCALITY.read_text())["passages"]


def standin() -> HallucinationSet:
    data = json.loads(STANDIN.read_text())
    return from_passages("stand-in", data["passages"], bundled_locality(),
                         {"built_by": data["built_by"], "built": data["date"]})


def _name_from_wikipedia(text: str) -> str:
    """A biography's subject from its first words ("John Smith (born 1950) is ..."): the
    text before the first bracket, comma or verb. Used when the file has no name field."""
    first = re.split(r"\s\(|,|\s(?:is|was|were|are)\s", text.strip(), maxsplit=1)[0]
    return " ".join(first.split()[:6]) or "this person"


def from_selfcheck(path: Path, locality: list[str] | None = None) -> HallucinationSet:
    """The public set from a file: a JSON list of records (or {"evaluation": [...]}, the
    dataset's split) or JSON lines. The subject's name comes from a `concept` or `name`
    field when present (the paper takes it from WikiBio), else from the Wikipedia text."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path.name}")
    raw = path.read_text(encoding="utf-8")
    try:
        records = json.loads(raw)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{path.name} is neither JSON nor JSON lines") from None
    if isinstance(records, dict):
        records = records.get("evaluation", records.get("data"))
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path.name} holds no list of records")
    passages = []
    for n, r in enumerate(records):
        try:
            sentences, marks, wiki = list(r["gpt3_sentences"]), list(r["annotation"]), str(r["wiki_bio_text"])
        except (KeyError, TypeError):
            raise ValueError(f"{path.name}: record {n + 1} lacks gpt3_sentences, annotation or wiki_bio_text") from None
        if len(sentences) != len(marks):
            raise ValueError(f"{path.name}: record {n + 1} has {len(sentences)} sentences but {len(marks)} labels")
        correct = split_sentences(wiki)[:len(marks)] or [wiki]
        passages.append({"name": str(r.get("concept") or r.get("name") or _name_from_wikipedia(wiki)),
                         "sentences": sentences, "annotation": marks,
                         "corrections": [correct[min(j, len(correct) - 1)] for j in range(len(marks))]})
    return from_passages(path.name, passages, locality or bundled_locality(), {"file": path.name})


# ---- building the stand-in -----------------------------------------------------------------
def _first_sentence(text: str) -> str:
    parts = split_sentences(text)
    return parts[0] if parts else text.strip()


def _first_sentences(backbone, texts: list[str], tokens: int, batch: int) -> list[str]:
    """The first sentence of the model's greedy plain continuation of each text."""
    out = []
    for i in range(0, len(texts), batch):
        out += [_first_sentence(c) for c in backbone.generate_batch(texts[i:i + batch], None, tokens, chat=False)]
    return out


def _states(continuation: str, truth: str) -> bool:
    """Does a continuation of a fact's opening state the known answer in its first words?"""
    words = re.findall(r"\w+", continuation.lower())[:len(truth.split()) + 3]
    want = re.findall(r"\w+", truth.lower())
    return any(words[i:i + len(want)] == want for i in range(len(words)))


def build_standin(backbone, tokens: int = 40, batch: int = 16) -> dict:
    """Passages the model writes about the CounterFact sample's subjects (plain
    continuation, greedy). Per subject: the header; s1, the model's first sentence after it
    (unchecked context); s2, the model's continuation of the fact's opening (CounterFact
    `prompt`, e.g. "The mother tongue of X is"); s3, its continuation of the same fact's
    paraphrased opening (`rephrase_prompt`). s2 and s3 are checked against the known answer
    (`ground_truth`): stated in the first words -> accurate, else inaccurate, corrected to
    the opening followed by the known answer."""
    records, seen = [], set()
    for r in counterfact_records():
        if r["subject"] not in seen:
            seen.add(r["subject"])
            records.append(r)

    heads = [header(r["subject"]) for r in records]
    s1 = _first_sentences(backbone, heads, tokens, batch)
    passages = [{"name": r["subject"], "sentences": [a], "annotation": ["unchecked"], "corrections": [None],
                 "truth": r["ground_truth"]} for r, a in zip(records, s1)]
    for field_name in ("prompt", "rephrase_prompt"):
        opens = [r[field_name].strip() for r in records]
        texts = [" ".join([h] + p["sentences"] + [o]) for h, p, o in zip(heads, passages, opens)]
        for p, o, said, r in zip(passages, opens, _first_sentences(backbone, texts, tokens, batch), records):
            right = _states(said, r["ground_truth"])
            p["sentences"].append(f"{o} {said}")
            p["annotation"].append("accurate" if right else "inaccurate")
            p["corrections"].append(None if right else f"{o} {r['ground_truth']}.")
    return {"about": "Stand-in for the WikiBio hallucination set, written by the default model about the subjects "
                     "of assets/data/counterfact_head.json (python -m melo_engine.bench standin). Sentence 1: the "
                     "model's own continuation of the header (unchecked); sentences 2 and 3: its continuations of "
                     "the fact's opening and of its paraphrased opening, checked against ground_truth.",
            "built_by": backbone.name, "date": time.strftime("%Y-%m-%d"), "source": str(DATA.name),
            "passages": passages}


def build_calibration_passages(backbone, n: int = 200, tokens: int = 40, batch: int = 16) -> dict:
    """Reference passages for the completion-mode radius (melo_engine/calibrate.py): the
    header and the model's own first two sentences about subjects of the second half of the
    zsRE sample's facts (the half the radius is calibrated on), none a CounterFact subject,
    so the stand-in's benchmark never calibrates on its own passages."""
    from melo_engine.refdata import calibration_questions

    taken = {r["subject"] for r in counterfact_records()}
    names = []
    for subject in calibration_questions()[1]:
        if subject not in taken and subject not in names:
            names.append(subject)
    names = names[:n]
    texts = [header(x) for x in names]
    sentences = [[] for _ in names]
    for _ in range(2):
        for s, said in zip(sentences, _first_sentences(backbone, texts, tokens, batch)):
            s.append(said)
        texts = [" ".join([header(x)] + s) for x, s in zip(names, sentences)]
    # A passage whose second sentence is empty (the model stopped) or repeats the first has
    # two continuation points with one text: no distance to learn from.
    kept = [{"name": x, "sentences": s} for x, s in zip(names, sentences) if all(s) and s[0] != s[1]]
    return {"about": "Passages the default model writes about zsRE subjects (the header and its first two "
                     "sentences, both present and different): the continuation points a completion-mode "
                     "radius is calibrated on (python -m melo_engine.bench standin).",
            "built_by": backbone.name, "date": time.strftime("%Y-%m-%d"), "subjects_tried": len(names),
            "passages": kept}


# ---- the benchmark -------------------------------------------------------------------------
def hallucination_benchmark(n: int | None, methods: list[str], data: str | None = None, backbone=None,
                            melo_settings: dict | None = None, show_progress: bool = True, checkpoint=None,
                            model: str | None = None, measured: int | None = None) -> dict:
    """Sequential sentence corrections, MELO against GRACE and plain LoRA, in one run.

    Per method: edit PPL of each edit right after it, and of every edit at the end; ARR PPL
    on the accurate sentences and locality PPL on the unrelated passages at the end; the
    unedited model's three under `base`. `model`: another model than the default (a hub id
    or a folder; its LoRA modules must be linear layers named like the default's). A PPL here is exp of the mean token NLL of one
    example; a set's figure is the mean over its examples. Prompts are plain text the model
    continues: MELO runs a workspace in completion mode (whose radius is calibrated on
    continuation points of passages, melo_engine/calibrate.py), GRACE and LoRA the same prompts.
    `measured`: only the first so many accurate sentences and unrelated passages (a short run).
    """
    from tqdm import tqdm

    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL
    from melo_engine.evaluate import passage_perplexities, perplexities
    from melo_engine.methods import build

    task = from_selfcheck(Path(data)) if data else standin()
    edits = task.edits[:n] if n else task.edits
    if not edits:
        raise ValueError("the data holds no inaccurate sentence to correct")
    bb = backbone or Backbone.load(model or DEFAULT_MODEL)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    prompts, targets = [e.prompt for e in edits], [e.target for e in edits]
    accurate, locality = task.accurate[:measured], task.locality[:measured]
    ap, at = [a.prompt for a in accurate], [a.target for a in accurate]

    def measure(m):
        return {"edit_ppl": mean(perplexities(bb, m, prompts, targets)),
                "arr_ppl": mean(perplexities(bb, m, ap, at)),
                "locality_ppl": mean(passage_perplexities(bb, m, locality))}

    settings = dict(melo_settings or {}, model=bb.name)
    out = {"dataset": "hallucination", "data": task.name, "n": len(edits), "model": bb.name,
           "machine": machine(), "date": time.strftime("%Y-%m-%d"), "set": task.notes,
           "measured": {"accurate": len(accurate), "locality_passages": len(locality)},
           "averaging": "mean over examples of exp(mean token NLL)", "base": measure(None),
           "paper": PAPER, "methods": {}}
    for name in methods:
        with tempfile.TemporaryDirectory() as tmp:
            m = build(name, bb, Path(tmp) / "ws", settings if name == "melo" else None, chat=False, ends=False)
            right_after, seconds = [], []
            for e in tqdm(edits, desc=f"hallucination {name}", disable=not show_progress):
                info = m.edit(e.prompt, e.target)
                seconds.append(info["seconds"])
                right_after.append(perplexities(bb, m, [e.prompt], [e.target])[0])
            res = {**measure(m), "edit_ppl_right_after": mean(right_after), "seconds_per_edit": mean(seconds),
                   **m.summary()}
            out["methods"][name] = res
            m.close()
            if checkpoint is not None:
                checkpoint(out)
    return out


def print_hallucination_table(res: dict) -> None:
    print(f"hallucination ({res['data']}), {res['n']} sequential sentence corrections, {res['model']}; "
          f"{res['set'].get('accurate')} accurate sentences, {res['set'].get('locality_passages')} unrelated passages")
    cols = ["edit_ppl", "arr_ppl", "locality_ppl", "edit_ppl_right_after", "seconds_per_edit"]
    print(f"{'':8}" + "".join(f"{c:>22}" for c in cols))
    rows = {"base": res["base"], **res["methods"]}
    for name, r in rows.items():
        print(f"{name:8}" + "".join(f"{r[c]:22.3f}" if c in r else f"{'-':>22}" for c in cols))


def run_hallucination(args) -> dict | int:
    """`bench edits --dataset hallucination` (edits.py's arguments)."""
    try:
        res = hallucination_benchmark(args.n, method_names(args.methods), data=args.data,
                                      melo_settings=melo_settings(args), checkpoint=json_checkpoint(args),
                                      model=args.model)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_hallucination_table(res)
    return res


def _add_standin_arguments(p) -> None:
    p.add_argument("--out", default=None, help="the stand-in only, to this file (default: both, into assets/)")


def _run_standin(args) -> int:
    from melo_engine.backbone import Backbone
    from melo_engine.config import DEFAULT_MODEL

    bb = Backbone.load(DEFAULT_MODEL)
    res = build_standin(bb)
    Path(args.out or STANDIN).write_text(json.dumps(res, indent=1) + "\n")
    if args.out is None:
        CALIBRATION.write_text(json.dumps(build_calibration_passages(bb), indent=1) + "\n")
    marks = [m for p in res["passages"] for m in p["annotation"]]
    print(f"{len(res['passages'])} passages: {marks.count('inaccurate')} inaccurate sentences (edits), "
          f"{marks.count('accurate')} accurate")
    return 0


STANDIN_BENCH = Benchmark("standin", "write the hallucination stand-in and the completion-mode calibration "
                                     "passages: passages the default model writes",
                          _add_standin_arguments, _run_standin)
