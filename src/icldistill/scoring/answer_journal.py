"""A journal of finished decode batches, so that a killed generation resumes at its next batch.

Greedy answers to a GSM8K question cost about a minute of a 1.5B on CPU, and an evaluation set is decoded in
one call: without a journal, a run killed near its end starts that set again. Greedy decoding of one batch
does not depend on any other batch (each starts from the shared prefix and its own queries, and batches are
formed the same way from the same prompts), so the answers of the batches that ended before a kill are
exactly what a rerun would compute. :func:`icldistill.scoring.generation.generate` appends each finished
batch to the journal (flushed and synced before the next batch starts) and skips a batch found there.

The file's first line is a key over the prompts, the decoding settings and what the caller adds (the run's
identity, the seed and the set; or the teacher cache's key): a journal with another key is another run's and
is started afresh, and a torn last line (a kill while writing) is dropped. Sampled decoding draws from one
generator across batches, so it is never journalled (on-policy training checkpoints its draws itself).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def journal_key(prompts: Sequence[Sequence[int]], settings: Any, *extra: Any) -> str:
    """What a journal answers: the prompts' token ids, the decoding settings (a dataclass) and ``extra``."""
    digest = hashlib.sha256()
    digest.update(json.dumps([asdict(settings), [str(e) for e in extra]], sort_keys=True).encode())
    for prompt in prompts:
        digest.update(json.dumps(list(prompt)).encode())
    return digest.hexdigest()[:32]


class AnswerJournal:
    """Finished batches of one decode (``path``), valid for the decode that ``key`` names."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key

    def load(self) -> dict[int, dict[str, Any]]:
        """The journalled answers (as written: ``tokens``, ``text``, ``finish``) by prompt index; empty when
        there is no journal or it is another decode's. Reads only: :meth:`open` readies the file too."""
        return self._answers(self._text())

    def open(self) -> dict[int, dict[str, Any]]:
        """What :meth:`load` returns, with the file read once and readied for the next batch: begun afresh
        (its key line) when absent or another decode's, a torn last line cut off so that the next batch
        starts a line of its own."""
        text = self._text()
        if _parse(text.split("\n", 1)[0]).get("key") != self.key:
            if text:
                logger.info("%s journals another decode (other prompts, settings or run): starting afresh", self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write(json.dumps({"key": self.key}) + "\n", mode="w")
            return {}
        if not text.endswith("\n"):
            self._write(text[:text.rfind("\n") + 1], mode="w")
        return self._answers(text)

    def _text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def _answers(self, text: str) -> dict[int, dict[str, Any]]:
        """The answers of a journal's ``text`` when its key is this decode's; a malformed line is ignored."""
        lines = text.splitlines()
        if not lines or _parse(lines[0]).get("key") != self.key:
            return {}
        done: dict[int, dict[str, Any]] = {}
        for line in lines[1:]:
            entry = _parse(line)
            indices, answers = entry.get("indices"), entry.get("answers")
            if isinstance(indices, list) and isinstance(answers, list) and len(indices) == len(answers) \
                    and all(isinstance(i, int) for i in indices) and all(map(_is_answer, answers)):
                done.update(zip(indices, answers))
        if done:
            logger.info("%s: %d answers journalled by an earlier attempt, not decoded again", self.path, len(done))
        return done

    def append(self, indices: Sequence[int], answers: Sequence[Any]) -> None:
        """Record one finished batch (its answers: dataclasses); on disk before this returns."""
        entry = {"indices": list(indices), "answers": [asdict(a) for a in answers]}
        self._write(json.dumps(entry) + "\n", mode="a")

    def _write(self, text: str, mode: str) -> None:
        with self.path.open(mode, encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def _is_answer(value: Any) -> bool:
    """Whether ``value`` is an answer as :meth:`AnswerJournal.append` writes one (else the line is ignored)."""
    return (isinstance(value, dict) and isinstance(value.get("tokens"), list)
            and all(isinstance(t, int) for t in value["tokens"])
            and isinstance(value.get("text"), str) and isinstance(value.get("finish"), str))


def _parse(line: str) -> dict[str, Any]:
    """One journal line as a dict; a torn or foreign line as an empty one."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
