"""Command line: python -m melo_engine --workspace WS {ask,edit,list,delete,export,import,stats,compact,repair}.

A classifier workspace (--model minilm-wordnet when new) has `classify TEXT` instead of
`ask`, and its edit is `edit TEXT --label LABEL`.

Bad input prints one line on stderr and exits with status 2; the workspace is unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from melo_engine.devices import DEVICES
from melo_engine.registry import KEY_SOURCES


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A usage mistake in one line (argparse prints the whole usage first), exit 2."""
        self.exit(2, f"error: {message} (python -m melo_engine --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m melo_engine", description="MELO model editing from the shell.")
    p.add_argument("--workspace", "-w", required=True, help="workspace directory (created if missing)")
    p.add_argument("--model", default=None, help="model for a new workspace: short name, hub id or directory")
    p.add_argument("--key-source", choices=KEY_SOURCES.names(), default=None,
                   help="for a new workspace: route by the sentence encoder (default) or the model's own layer")
    p.add_argument("--prompt-mode", choices=["chat", "completion"], default=None,
                   help="for a new workspace: prompts as a chat turn (default) or plain text the model continues")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="where the model runs: cpu, cuda, mps or auto (default: $MELO_DEVICE, else auto: a GPU if there is one)")
    p.add_argument("--layers-path", default=None,
                   help="for a new workspace on a model type MELO has no row for: the decoder's layer list, e.g. model.layers")
    p.add_argument("--lora-modules", default=None,
                   help="for a new workspace: the modules inside a layer that carry the blocks, comma-separated "
                        "(default: the architecture's FFN output, e.g. mlp.down_proj)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ask", help="answer a question with the edited model")
    a.add_argument("question")
    a.add_argument("--base", action="store_true", help="also show the unedited model's answer")
    a.add_argument("--sentences", action="store_true", help="number the answer's sentences (for `correct`)")
    e = sub.add_parser("edit", help="make the model answer PROMPT with TARGET (a classifier: TEXT --label LABEL)")
    e.add_argument("prompt")
    e.add_argument("target", nargs="?", default=None)
    e.add_argument("--label", default=None, help="a classifier workspace: the label TEXT should get")
    e.add_argument("--prefix", default=None,
                   help="correct one sentence: the answer's text before it, kept exactly; TARGET replaces the sentence")
    c = sub.add_parser("correct", help="replace sentence N of the answer to QUESTION by SENTENCE, keeping what came before")
    c.add_argument("question")
    c.add_argument("number", type=int, help="which sentence, 1 for the first (see ask --sentences)")
    c.add_argument("sentence")
    c.add_argument("--end", action="store_true", help="the answer stops after the corrected sentence")
    k = sub.add_parser("classify", help="a classifier workspace: the label of TEXT and the block that fired")
    k.add_argument("text")
    k.add_argument("--base", action="store_true", help="also show the unedited classifier's label")
    sub.add_parser("list", help="list the edits")
    d = sub.add_parser("delete", help="undo one edit")
    d.add_argument("edit_id")
    x = sub.add_parser("export", help="write all edits to a file")
    x.add_argument("file")
    i = sub.add_parser("import", help="add the edits of an exported file")
    i.add_argument("file")
    sub.add_parser("stats", help="counts and sizes")
    pb = sub.add_parser("probes", help="the shared question list of the model and key setting, checked after every edit in every workspace on them: load FILE, list, remove SOURCE")
    pb.add_argument("action", choices=["load", "list", "remove"])
    pb.add_argument("what", nargs="?", default=None,
                    help="load: a .txt (one question a line), .json or .csv file; remove: a source (see list)")
    sub.add_parser("compact", help="write the workspace as one snapshot (done by itself every 1000 commits)")
    sub.add_parser("repair", help="rebuild the index and set aside a damaged journal's tail (nothing is deleted)")
    return p


def run(args) -> object:
    from melo_engine import MeloConfig, MeloEditor, store
    from melo_engine.checks import clean_text

    for value in vars(args).values():       # before anything is opened
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("an argument is not valid UTF-8 text") from None
    texts = {"ask": [("question", "the question")], "edit": [("prompt", "the prompt")], "classify": [("text", "the text")],
             "correct": [("question", "the question"), ("sentence", "the corrected sentence")],
             "delete": [("edit_id", "the edit id")]}.get(args.command, [])
    if args.command == "edit" and args.target is not None:
        texts.append(("target", "the target"))
    if args.command == "edit" and (args.target is None) == (args.label is None):
        raise ValueError("edit takes PROMPT TARGET, or for a classifier TEXT --label LABEL")
    for attr, what in texts:                 # refused before the model is loaded
        clean_text(getattr(args, attr), what, limit=10 ** 9)
    if args.command == "repair":
        return MeloEditor.repair(args.workspace)
    if args.command == "correct" and args.number < 1:
        raise ValueError("the sentence number starts at 1")
    from melo_engine.classifier.editor import ClassifierEditor, classifier_config, is_classifier_workspace

    modules = tuple(m.strip() for m in args.lora_modules.split(",") if m.strip()) if args.lora_modules else None
    new = {k: v for k, v in (("key_source", args.key_source), ("prompt_mode", args.prompt_mode),
                             ("layers_path", args.layers_path), ("lora_modules", modules)) if v}
    classifier = is_classifier_workspace(args.workspace, args.model)
    editor = ClassifierEditor if classifier else MeloEditor
    config = (classifier_config(args.model or "minilm-wordnet", **new) if classifier else MeloConfig(**new)) if new else None
    # Commands that only read open an existing workspace read-only: not a byte is written,
    # so they work on a read-only workspace and never touch what they cannot account for.
    reading = args.command in ("ask", "classify", "list", "export", "stats", "probes") and (Path(args.workspace) / store.HEADER).is_file()
    new_workspace = not os.path.lexists(args.workspace)
    ed = editor.open(args.workspace, model=args.model, config=config, read_only=reading, device=args.device)
    try:
        return command(ed, args)
    except BaseException:
        # A refused command leaves no workspace behind, but removes only one it made itself
        # and still holds the lock of: one without a single commit (store.discard), never
        # one another process has filled meanwhile.
        if new_workspace:
            with contextlib.suppress(OSError):
                ed.store.discard()
        raise
    finally:
        ed.close()


def command(ed, args) -> object:
    """Run the command on the open editor `ed`."""
    if args.key_source and ed.config.key_source != args.key_source:
        raise ValueError(f"this workspace routes by the {ed.config.key_source} key; --key-source applies to new ones")
    if args.prompt_mode and ed.config.prompt_mode != args.prompt_mode:
        raise ValueError(f"this workspace is in {ed.config.prompt_mode} mode; --prompt-mode applies to new ones")
    if args.command == "ask":
        answer = ed.ask(args.question, compare_base=args.base)
        if args.sentences:
            from melo_engine.sentences import split_sentences

            return {"answer": answer.text, **{str(i): s for i, s in enumerate(split_sentences(answer.text), 1)}}
        return answer
    labels = getattr(ed, "labels", None)       # a classifier workspace
    if args.command == "classify":
        if labels is None:
            raise ValueError("this workspace answers questions; classify needs a classifier workspace "
                             "(--model minilm-wordnet)")
        return ed.classify(args.text, compare_base=args.base)
    if args.command == "edit":
        if (labels is None) != (args.label is None):
            raise ValueError("a classifier workspace edits TEXT --label LABEL" if labels is not None
                             else "--label is for a classifier workspace; give PROMPT TARGET")
        if labels is not None:
            return ed.edit(args.prompt, args.label)
        return ed.edit(args.prompt, args.target, prefix=args.prefix)
    if args.command == "correct":
        return ed.correct(args.question, args.number, args.sentence, end=args.end)
    if args.command == "list":
        return ed.edits()
    if args.command == "delete":
        ed.delete(args.edit_id)
        return {"deleted": args.edit_id}
    if args.command == "export":
        return {"exported": str(ed.export(args.file)), "edits": sum(e["status"] == "active" for e in ed.edits())}
    if args.command == "import":
        report = ed.import_report(args.file)
        return {"imported": report.added, "skipped (already here)": report.skipped, "superseded": report.superseded}
    if args.command == "probes":
        return probes(ed, args.action, args.what)
    if args.command == "compact":
        ed.compact()
        return {"compacted": ed.store.seq, "disk_bytes": ed.store.disk_bytes()}
    return ed.stats()


def probes(ed, action: str, what: str | None) -> dict:
    """The shared list of the workspace's model and key setting (every workspace on them
    checks against it; a workspace's own questions come from the web page): load a file of
    questions, list the sources, remove one."""
    if action != "list" and not what:
        raise ValueError(f"probes {action} needs {'a file' if action == 'load' else 'a source'}")
    bank = ed.probe_bank(shared=True)
    if action == "load":
        added, skipped = bank.add_file(what)
        return {"added": added, "skipped (already in the bank)": skipped, "questions": bank.count()}
    if action == "remove":
        return {"removed": bank.remove_source(what), "questions": bank.count()}
    return {"questions": bank.count(), **{f"source {k}": v for k, v in bank.sources().items()}}


def show(result) -> str:
    """Human-readable text for a command's result."""
    from melo_engine import Answer, EditResult
    from melo_engine.classifier.editor import Classified

    if isinstance(result, Classified):
        fired = f"block {result.block}" if result.block is not None else "none: original classifier"
        where = "" if result.distance is None else f" (distance {result.distance:.3f}, radius {result.radius:.3f})"
        bars = "\n".join(f"  {k:14s} {v:6.3f} {'#' * round(40 * v)}"
                         for k, v in sorted(result.probabilities.items(), key=lambda kv: -kv[1]))
        out = f"{result.label}\n[{fired}{where}]\n{bars}"
        return out + (f"\n[unedited] {result.base_label}" if result.base_label is not None else "")
    if isinstance(result, Answer):
        fired = f"block {result.block}" if result.block is not None else "none: original model"
        where = "" if result.distance is None else f" (distance {result.distance:.3f}, radius {result.radius:.3f})"
        out = f"{result.text}\n[{fired}{where}]"
        if result.base_text is not None:
            out += f"\n[unedited] {result.base_text}"
        return out
    if isinstance(result, EditResult):
        lost = f", forgot {', '.join(result.forgotten)}" if result.forgotten else ""
        lost += f", moved {', '.join(result.moved)} to clusters of their own" if result.moved else ""
        return (f"edit {result.edit_id}: block {result.block}, cluster {result.cluster} ({result.action}{lost}), "
                f"{result.steps} steps, loss {result.losses[-1]:.3f}, {result.seconds:.2f} s")
    if isinstance(result, list):
        return "\n".join(f"{e['id']}  block {e['block']}  {e['status']:9s}  {e['prompt']!r} -> {e['target']!r}"
                         for e in result) or "(no edits)"
    return "\n".join(f"{k}: {v}" for k, v in result.items())


def main(argv=None) -> int:
    from melo_engine.model import quiet_env

    quiet_env()
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError) as err:
        if not isinstance(err, ValueError):     # (a StorageError is both, and already one line)
            where = f" ({Path(err.filename).name})" if getattr(err, "filename", None) else ""
            err = f"{err.strerror or type(err).__name__}{where}"
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
        print(json.dumps(data, indent=1))
    else:
        print(show(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
