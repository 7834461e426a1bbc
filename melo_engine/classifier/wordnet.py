"""The classification data: WordNet 3.0 noun definitions labelled with their lexicographer
category (what kind of thing the definition describes), split by branch of the hierarchy (a shift in topic).

Why this split. The paper's task (GRACE's SCOTUS) trains a classifier on older court
opinions and edits it on newer ones it gets wrong: the same kind of text, shifted in what
it talks about. WordNet has no dates, but its hierarchy gives the same kind of shift: each
category's synsets fall into branches (the hypernym just below the category's top
concepts: vertebrates and invertebrates under animal, herbs and trees under plant, ...).
The branches of each category are split into two halves of about equal size, the largest
first, each to the lighter side. The upstream classifier is trained and tested on
definitions from one half; the edit stream is definitions from the other half, topics it
has seen nothing of (trained on chordates, edited on insects), the way later court cases
bring issues the older ones did not. Same genre, same labels, other content.

`python -m melo_engine.classifier.wordnet` rebuilds the shipped sample from Debian's
`wordnet-base` (/usr/share/wordnet); a fresh clone never needs it, the sample is in
assets/data (with WordNet's licence, which asks that its notice travel with every copy).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parents[2] / "assets" / "data" / "wordnet_categories.jsonl.gz"

# Eleven noun categories (SCOTUS has eleven issue areas), the concrete and distinct ones;
# lexicographer file numbers as in WordNet's lexnames.
CATEGORIES = {4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 10: "communication",
              13: "food", 15: "location", 18: "person", 20: "plant", 27: "substance"}
SEED = 0
PER_CATEGORY = {"train": 150, "test": 30, "edit": 220}


@dataclass
class Synset:
    offset: str
    lexfile: int
    words: list[str]
    definition: str
    hypernym: str | None      # the first (instance) hypernym's offset


def noun_synsets(source: Path) -> dict[str, Synset]:
    """Every noun synset of data.noun, by offset."""
    out = {}
    for line in (source / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):          # the licence header
            continue
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()
        n = int(parts[3], 16)
        words = [parts[4 + 2 * i].replace("_", " ") for i in range(n)]
        i = 4 + 2 * n
        pointers = parts[i + 1:i + 1 + 4 * int(parts[i])]
        hypernyms = [pointers[j + 1] for j in range(0, len(pointers), 4) if pointers[j] in ("@", "@i")]
        out[parts[0]] = Synset(parts[0], int(parts[1]), words, gloss.split(";")[0].strip(),
                               hypernyms[0] if hypernyms else None)
    return out


def branch(synsets: dict[str, Synset], offset: str) -> str:
    """The ancestor just below the top of the synset's own category (itself near the top)."""
    chain = [offset]
    while True:
        up = synsets[chain[-1]].hypernym
        if up is None or synsets[up].lexfile != synsets[offset].lexfile:
            break
        chain.append(up)
    return chain[-2] if len(chain) >= 2 else chain[-1]


def halves(sizes: dict[str, int]) -> set[str]:
    """The branches of the upstream half: largest first, each to the lighter half."""
    upstream, weights = set(), [0, 0]
    for b, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        side = 0 if weights[0] <= weights[1] else 1
        weights[side] += n
        if side == 0:
            upstream.add(b)
    return upstream


def build(source: Path = SOURCE, out: Path = OUT, seed: int = SEED) -> dict[str, int]:
    """Write the sample: per category, the upstream half's definitions to train/test and
    the other half's to edit."""
    if not (source / "data.noun").is_file():
        raise ValueError(f"WordNet is not at {source} (apt-get install wordnet-base)")
    synsets = noun_synsets(source)
    kept = [s for s in synsets.values() if s.lexfile in CATEGORIES and len(s.definition) >= 12]
    branches = {s.offset: branch(synsets, s.offset) for s in kept}
    upstream = set()
    for lexfile in CATEGORIES:
        upstream |= halves(collections.Counter(branches[s.offset] for s in kept if s.lexfile == lexfile))
    by = collections.defaultdict(lambda: {"upstream": [], "shifted": []})
    seen = set()
    for s in kept:
        if s.definition in seen:
            continue
        seen.add(s.definition)
        label = CATEGORIES[s.lexfile]
        by[label]["upstream" if branches[s.offset] in upstream else "shifted"].append(
            {"text": s.definition, "label": label, "words": s.words, "branch": synsets[branches[s.offset]].words[0],
             "branch_offset": branches[s.offset]})
    rng = random.Random(seed)
    rows = []
    for label in sorted(by):
        upstream_rows, shifted = by[label]["upstream"], by[label]["shifted"]
        rng.shuffle(upstream_rows)
        rng.shuffle(shifted)
        n_train, n_test = PER_CATEGORY["train"], PER_CATEGORY["test"]
        rows += [dict(r, split="train") for r in upstream_rows[:n_train]]
        rows += [dict(r, split="test") for r in upstream_rows[n_train:n_train + n_test]]
        rows += [dict(r, split="edit") for r in shifted[:PER_CATEGORY["edit"]]]
    rng.shuffle(rows)                      # the stream's order: fixed by the seed
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime 0: the same data gives the same bytes (the head cache keys on them)
    with gzip.GzipFile(out, "wb", mtime=0) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return dict(collections.Counter(r["split"] for r in rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m melo_engine.classifier.wordnet", description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, default=SOURCE)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    print(build(args.source, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
