"""IEMOCAP, 4 emotions: a train/eval manifest pair per held-out session.

The layout: ``Session<k>/sentences/wav/<dialog>/<turn>.wav`` and
``Session<k>/dialog/EmoEvaluation/<dialog>.txt``.

Each utterance's label is the emotion of its ``[start - end]<TAB>TURN<TAB>EMOTION<TAB>[V, A, D]``
line: ``neu`` neutral, ``hap`` and ``exc`` happy, ``sad`` sad, ``ang`` angry; other emotions are
left out and counted. Writes ``session<k>/train.json`` (the other four sessions),
``session<k>/eval.json`` (session k) and a label csv in each folder, so
``data.root=<dst>/session<k>`` is one fold.
"""

from __future__ import annotations

import argparse
from collections import Counter

from ssamba.prepare.common import (LABEL_CSV, Clip, LayoutError, Preparation, Training, require,
                                    require_listed)

SESSIONS = (1, 2, 3, 4, 5)
CLASSES = ("neutral", "happy", "sad", "angry")
EMOTIONS = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}
TARGET_LENGTH = 1024


def read_session(prep: Preparation, session: int, excluded: Counter) -> list[Clip]:
    folder = require(prep.src / f"Session{session}", f"Session{session} folder")
    evaluation = require(folder / "dialog" / "EmoEvaluation", f"Session{session}/dialog/EmoEvaluation")
    wav = require(folder / "sentences" / "wav", f"Session{session}/sentences/wav")
    clips = []
    for txt in sorted(p for p in evaluation.glob("*.txt") if not p.name.startswith(".")):
        with open(txt, errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 4 or not fields[0].startswith("["):
                    continue
                emotion = fields[2].strip()
                if emotion in EMOTIONS:
                    clips.append(Clip(str(wav / txt.stem / f"{fields[1].strip()}.wav"), (EMOTIONS[emotion],)))
                else:
                    excluded[emotion] += 1
    if not clips:
        raise LayoutError(f"no '[start - end]<TAB>turn<TAB>emotion<TAB>[V, A, D]' lines of the four classes "
                          f"in {evaluation}/*.txt")
    require_listed((c.wav for c in clips), f"Session{session}/dialog/EmoEvaluation/*.txt", wav)
    return clips


def prepare(prep: Preparation, args: argparse.Namespace) -> Training:
    excluded: Counter = Counter()
    sessions = {k: read_session(prep, k, excluded) for k in SESSIONS}
    prep.notes["excluded_emotions"] = dict(sorted(excluded.items()))
    labels = [(c, c) for c in CLASSES]
    for held_out in SESSIONS:
        prep.write_label_csv(f"session{held_out}/{LABEL_CSV}", labels)
        prep.write_manifest(f"session{held_out}/train.json",
                            [c for k in SESSIONS if k != held_out for c in sessions[k]])
        prep.write_manifest(f"session{held_out}/eval.json", sessions[held_out])
    return [(f"session{k}/train.json", f"session{k}/{LABEL_CSV}") for k in SESSIONS]
