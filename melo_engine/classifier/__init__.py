"""Editing a classifier, the paper's first task (GRACE's SCOTUS protocol), offline: a BERT
encoder (the bundled all-MiniLM-L6-v2) with a head trained on WordNet definitions labelled
by lexicographer category.

- `wordnet`: builds the shipped data sample from Debian's wordnet-base;
- `backbone`: the frozen classifier, run in parts (keys, training, the head);
- `editor`: a MeloEditor whose edits are (text, correct label);
- `methods`: MELO, GRACE and plain LoRA on a classifier, for the benchmark.
"""
