"""The generation teacher's side of distillation: its answers, its top-k log-probabilities, its scores of samples.

The teacher sees the context (instruction + demonstrations); the student never does. Every teacher pass
goes through the context's KV cache, computed once (``scoring.prefix_cache.PrefixCache``): greedy answers
through ``scoring.generation.generate``, and the logits at answer tokens (its own or the student's samples)
through ``training.sequence.answer_logits`` after that cache, so only query + answer tokens cost.

The off-policy pass is a constant: the answers of (teacher, prompts, decoding), and for the ``token``
signal the top-k at them (a second entry, keyed by the answers' key and k). Both are stored under the
cache directory (``<cache>/generation-teacher/<key>.safetensors`` and a ``.json`` with its checksum, both
written atomically); a rerun with the same keys never loads the teacher, and the ``sequence`` and
``token`` signals share the answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as tensors_to_bytes

from icldistill.errors import IcldError
from icldistill.runtime import distributed
from icldistill.runtime.locks import exclusive
from icldistill.runtime.paths import default_cache_dir
from icldistill.runtime.records import atomic_write_bytes, atomic_write_json
from icldistill.runtime.rundir import JOURNAL_SUFFIX, LOCK_SUFFIX
from icldistill.scoring.answer_journal import AnswerJournal
from icldistill.scoring.encoding import common_prefix_length
from icldistill.scoring.generation import DecodeSettings, Generated, generate, has_sliding_window, prefix_for_rows
from icldistill.scoring.prefix_cache import PrefixCache
from icldistill.training.sequence import AnswerHidden, answer_batch, answer_logits, answer_scores
from icldistill.training.teacher import signal_code_version

logger = logging.getLogger(__name__)

CODE = ("icldistill.methods.gen_teacher", "icldistill.scoring.generation", "icldistill.scoring.prefix_cache",
        "icldistill.training.sequence", "icldistill.tasks.generation")
"""The modules whose code makes a cached teacher pass: a change to any of them changes every key."""


def code_version() -> str:
    """The hash of :data:`CODE`'s source, as the classification teacher cache keys its entries."""
    return signal_code_version(CODE)


def end_token(model: Any, tokenizer: Any) -> int:
    """The token that ends an answer in training targets: the generation config's first EOS (an instruct
    model's end of turn), else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, (list, tuple)) and configured:
        return int(configured[0])
    if isinstance(configured, int):
        return configured
    if tokenizer.eos_token_id is None:
        raise IcldError("the model has no EOS token: an answer's end cannot be trained.")
    return int(tokenizer.eos_token_id)


def answer_tokens(generated: Generated, eos: int) -> list[int]:
    """An answer's training tokens: what was generated, plus EOS where the model ended it (never empty)."""
    tokens = list(generated.tokens)
    return tokens + [eos] if generated.finish == "eos" or not tokens else tokens


@dataclass
class TeacherAnswers:
    """The teacher's answers to the training queries (with its context), in query order, and where cached,
    its top-k log-probabilities at every answer token (flattened in query order: (tokens, k))."""

    answers: list[list[int]]  # token ids, EOS appended where the teacher ended the answer
    texts: list[str]
    finish: list[str]
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None

    def topk_rows(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k entries of the answers at ``indices``, concatenated in that order (an AnswerBatch's order)."""
        assert self.topk_logprobs is not None and self.topk_ids is not None
        starts = [0]
        for a in self.answers:
            starts.append(starts[-1] + len(a))
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in indices])
        return self.topk_logprobs[rows], self.topk_ids[rows]

    def summary(self) -> dict[str, Any]:
        n = max(len(self.answers), 1)
        return {"n": len(self.answers), "mean_tokens": sum(map(len, self.answers)) / n,
                "finish": {f: self.finish.count(f) for f in sorted(set(self.finish))}}


def context_prefix(model: Any, prompts: Sequence[Sequence[int]]) -> PrefixCache | None:
    """The prompts' shared prefix (the context) prefilled once; every prompt keeps a token of its own."""
    n = min(common_prefix_length(prompts), min(map(len, prompts)) - 1)
    if n <= 0:
        return None
    prefix = PrefixCache(model, list(prompts[0][:n]))
    return None if prefix.unsupported is not None else prefix


def context_logits(model: Any, prefix: PrefixCache | None, prompts: Sequence[Sequence[int]],
                   answers: Sequence[Sequence[int]], pad_id: int, chunked: bool = False
                   ) -> torch.Tensor | AnswerHidden:
    """(tokens, vocab) logits of ``model`` at the answer tokens after the whole prompts, in row order, the
    context's cache shared: each row costs its query and answer only. ``chunked``: as
    ``training.sequence.answer_scores`` returns them (hidden states and head; the loss computes the logits a
    chunk at a time) where it can.

    A sliding attention window counts the pads between the context and a shorter query as positions (the
    window would drop context tokens that the whole prompt sees), so for such a model the rows run in groups
    of one query length, as ``scoring.generation`` batches them.
    """
    past = prefix.length if prefix is not None else 0
    score = answer_scores if chunked else answer_logits
    groups = [list(range(len(prompts)))]
    if past and has_sliding_window(model):
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        groups = list(by_length.values())
    parts = []
    for rows in groups:
        batch = answer_batch([prompts[i][past:] for i in rows], [answers[i] for i in rows], pad_id, past=past)
        parts.append((rows, score(model, batch, prefix_for_rows(prefix, batch.n) if prefix is not None else None)))
    return parts[0][1] if len(parts) == 1 else _in_row_order(parts, [len(a) for a in answers])


def _in_row_order(parts: list[tuple[list[int], Any]], lengths: list[int]) -> torch.Tensor | AnswerHidden:
    """Groups' per-token outputs (rows, logits or AnswerHidden), each row ``lengths[row]`` tokens, put back in
    row order."""
    pieces: dict[int, torch.Tensor] = {}
    for rows, out in parts:
        tokens = out if isinstance(out, torch.Tensor) else out.hidden
        pieces.update(zip(rows, torch.split(tokens, [lengths[i] for i in rows])))
    whole = torch.cat([pieces[i] for i in range(len(lengths))])
    first = parts[0][1]
    return whole if isinstance(first, torch.Tensor) else dataclasses.replace(first, hidden=whole)


def teacher_answers(teacher: Any, prompts: Sequence[Sequence[int]], settings: DecodeSettings,
                    progress: Any = None, journal: AnswerJournal | None = None) -> TeacherAnswers:
    """The teacher's greedy answers with its context (prefilled once, shared by every batch)."""
    model, tokenizer = teacher.model, teacher.tokenizer
    generated = generate(model, tokenizer, prompts, settings, use_prefix_cache=True, progress=progress,
                         journal=journal)
    eos = end_token(model, tokenizer)
    return TeacherAnswers([answer_tokens(g, eos) for g in generated], [g.text for g in generated],
                          [g.finish for g in generated])


def teacher_topk(teacher: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], batch_size: int,
                 topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, k) top-k log-probabilities and ids of the teacher at every answer token, after its context
    (a chunk of tokens' logits at a time where the model allows: a batch's whole logits would be GBs)."""
    model, tokenizer = teacher.model, teacher.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix = context_prefix(model, prompts)
    values, ids = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            scores = context_logits(model, prefix, prompts[part], answers[part], pad, chunked=True)
            chunks = [scores.float()] if isinstance(scores, torch.Tensor) else scores.logit_chunks()
            for logits in chunks:
                top = torch.log_softmax(logits, dim=-1).topk(min(topk, logits.shape[-1]), dim=-1)
                values.append(top.values.cpu())
                ids.append(top.indices.cpu())
    return torch.cat(values), torch.cat(ids)


def cache_key(teacher_identity: dict[str, Any], prompts: Sequence[Sequence[int]], settings: DecodeSettings
              ) -> tuple[str, dict[str, Any]]:
    """A content hash of everything the teacher's answers depend on (teacher, prompts, decoding, code)."""
    description = {
        "code": code_version(),
        "teacher": {k: teacher_identity.get(k) for k in ("name", "fingerprint", "dtype", "commit")},
        "prompts": hashlib.sha256(json.dumps([list(map(int, p)) for p in prompts]).encode()).hexdigest(),
        "n_prompts": len(prompts),
        "decoding": {"max_new_tokens": settings.max_new_tokens, "stop": list(settings.stop), "greedy": True},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24], description


def topk_key(answers_key: str, topk: int) -> str:
    """The key of the top-k at the answers of ``answers_key`` (teacher + prompts + answers) for this k."""
    return hashlib.sha256(f"{answers_key}:topk:{topk}".encode()).hexdigest()[:24]


class AnswerCache:
    """Teacher passes on disk: ``<key>.safetensors`` and ``<key>.json`` (written last, with its checksum)."""

    def __init__(self, cache_dir: str | Path | None):
        base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.directory = base / "generation-teacher"

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.safetensors", self.directory / f"{key}.json"

    def journal(self, key: str) -> AnswerJournal | None:
        """The answers of the pass ``key`` batch by batch while it runs (a killed pass resumes; ``save``
        removes it); rank 0 alone keeps one."""
        return AnswerJournal(self._journal_path(key), key) if distributed.is_main() else None

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Held while the pass ``key`` is read or computed, so that two workers needing it (the token and
        sequence signals of one seed in a sweep) decode it once: the second waits, then reads the entry."""
        return exclusive(self.directory / f"{key}{LOCK_SUFFIX}", f"computing the teacher pass {key}")

    def _journal_path(self, key: str) -> Path:
        return self.directory / f"{key}{JOURNAL_SUFFIX}"

    def _read(self, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        tensors_path, meta_path = self.paths(key)
        if not (tensors_path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != hashlib.sha256(tensors_path.read_bytes()).hexdigest():
                raise ValueError("checksum mismatch")
            return meta, load_file(str(tensors_path))
        except (OSError, ValueError, KeyError, SafetensorError, json.JSONDecodeError) as exc:
            logger.warning("generation teacher cache entry %s is unusable (%s); recomputing", key, exc)
            return None

    def _write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        tensors_path, meta_path = self.paths(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(tensors_path, tensors_to_bytes({k: v.contiguous() for k, v in tensors.items()}))
        atomic_write_json(meta_path, {"key": key, **meta,
                                      "sha256": hashlib.sha256(tensors_path.read_bytes()).hexdigest()})

    def load(self, key: str) -> TeacherAnswers | None:
        """The cached answers, or None when absent, partial or corrupt (then they are computed again)."""
        found = self._read(key)
        if found is None:
            return None
        meta, tensors = found
        flat, answers, start = tensors["answers"].tolist(), [], 0
        for n in tensors["lengths"].tolist():
            answers.append(flat[start:start + n])
            start += n
        return TeacherAnswers(answers, meta["texts"], meta["finish"])

    def save(self, key: str, answers: TeacherAnswers, description: dict[str, Any]) -> None:
        tensors = {"answers": torch.tensor([t for a in answers.answers for t in a], dtype=torch.long),
                   "lengths": torch.tensor([len(a) for a in answers.answers], dtype=torch.long)}
        self._write(key, tensors, {"description": description, "texts": answers.texts, "finish": answers.finish})
        self._journal_path(key).unlink(missing_ok=True)

    def load_topk(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        found = self._read(key)
        return None if found is None else (found[1]["topk_logprobs"], found[1]["topk_ids"])

    def save_topk(self, key: str, logprobs: torch.Tensor, ids: torch.Tensor, description: dict[str, Any]) -> None:
        self._write(key, {"topk_logprobs": logprobs, "topk_ids": ids}, {"description": description})


__all__ = ["AnswerCache", "TeacherAnswers", "answer_tokens", "cache_key", "context_logits", "context_prefix",
           "end_token", "teacher_answers", "teacher_topk", "topk_key"]
