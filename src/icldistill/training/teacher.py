"""Where the teacher's signal comes from: computed online, or computed once and read from a cache.

*How* the signal is scored (the loss) lives in ``losses``; this module only answers "what does the
teacher, shown these demonstrations, say about these queries?" (the DistillKit split of signals and
losses). The teacher is frozen and its demonstrations are fixed, so its answer to each training query
is a constant: the cached signal is computed once per (teacher, pattern, demonstrations, queries,
code version), stored under the cache directory, and every later run with the same key reuses it and
never loads the teacher. A partial or corrupt file is detected by its checksum and recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
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
from icldistill.models.loading import LoadedModel
from icldistill.runtime import distributed
from icldistill.runtime.records import atomic_write_bytes, atomic_write_json
from icldistill.scoring.encoding import encode_text, fits_in_context, tokenize_prompts
from icldistill.scoring.evalsets import encode_prompts
from icldistill.scoring.prefix_cache import PrefixCache, Scores, score_queries, score_queries_sharded
from icldistill.tasks.data import Example
from icldistill.tasks.prompts import Pattern
from icldistill.training.contexts import tempered_context_average

logger = logging.getLogger(__name__)

# The modules whose code computes a signal: a change to any of them changes the cache key, so a cached
# entry is never reused after the code that made it changed (no hand-set version to forget to bump).
SIGNAL_CODE = ("icldistill.training.teacher", "icldistill.training.contexts", "icldistill.scoring.prefix_cache",
               "icldistill.scoring.evalsets", "icldistill.scoring.encoding", "icldistill.tasks.prompts")


@functools.cache
def signal_code_version(modules: tuple[str, ...] = SIGNAL_CODE) -> str:
    """A hash of the source of the modules that compute the teacher signal (part of every cache key)."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise IcldError(f"cannot find the source of {name} to key the teacher cache")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


TOKENIZATION = "whole-prompt"  # recorded in every cache key: how the teacher's prompts were tokenized


@dataclass
class TeacherSignal:
    """The teacher's answers for the training queries, in query order.

    label_logprobs (n, C): log of the class distribution over the label words, averaged (in
    probability space) over the demonstration contexts. context_label_logprobs (J, n, C): each
    context's own distribution (renormalised over the labels), so that a temperature can be applied to
    each before averaging. topk_logprobs / topk_ids (n, k): the teacher's top-k next-token
    log-probabilities of the first context (vocabulary KL), or None.
    """

    query_ids: list[str]
    label_logprobs: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    contexts: list[list[str]] | None = None  # demonstration ids of each context
    dropped: int = 0
    context_label_logprobs: torch.Tensor | None = None

    def rows(self, rows: torch.Tensor) -> TeacherSignal:
        """The signal of some queries (by row index), for a training batch."""
        return TeacherSignal([self.query_ids[int(i)] for i in rows], self.label_logprobs[rows],
                             None if self.topk_logprobs is None else self.topk_logprobs[rows],
                             None if self.topk_ids is None else self.topk_ids[rows], self.contexts, 0,
                             None if self.context_label_logprobs is None else self.context_label_logprobs[:, rows])


def _merge_contexts(per_context: Sequence[Scores]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(context-averaged label log-probs, top-k log-probs, top-k ids); top-k come from the first context."""
    first = per_context[0]
    return tempered_context_average(_per_context(per_context)), first.topk_logprobs, first.topk_ids


def _per_context(per_context: Sequence[Scores]) -> torch.Tensor:
    """(J, n, C) label distributions of each context, renormalised over the labels."""
    stacked = torch.stack([s.label_logprobs for s in per_context])
    return stacked - torch.logsumexp(stacked, dim=-1, keepdim=True)


def compute_signal(
    teacher: LoadedModel,
    pattern: Pattern,
    contexts: Sequence[Sequence[Example]],
    queries: Sequence[Example],
    *,
    batch_size: int,
    topk: int = 0,
    use_prefix_cache: bool = True,
    progress: bool = True,
    label_score: str = "sum",
) -> TeacherSignal:
    """Score every query under every context with the teacher; queries that do not fit are an error.

    Every training query needs a target, so a query too long for the teacher's context is not
    silently dropped here: it fails with the number of tokens and the fix.
    """
    from tqdm.auto import tqdm

    per_context = []
    for j, demos in enumerate(contexts):
        encoded = encode_prompts(teacher, pattern, demos, queries)
        if encoded.dropped:
            raise IcldError(f"{encoded.dropped} training queries do not fit {teacher.name}'s context after "
                             f"{len(demos)} demonstrations; lower --shots.")
        # Under N processes each rank scores its shard of the queries; every rank gets the whole signal.
        with tqdm(total=distributed.shard_size(len(queries)), desc=f"teacher context {j}", unit="q",
                  disable=not progress or not distributed.is_main(), leave=False) as bar:
            scores = score_queries_sharded(teacher.model, encoded.prefix_ids, encoded.query_ids, encoded.continuations,
                                           batch_size=batch_size, use_prefix_cache=use_prefix_cache,
                                           topk=topk if j == 0 else 0, on_batch=bar.update, label_score=label_score)
        per_context.append(scores)
    return TeacherSignal([q.id for q in queries], *_merge_contexts(per_context),
                         [[d.id for d in demos] for demos in contexts],
                         context_label_logprobs=_per_context(per_context))


def signal_key(teacher: dict[str, Any], pattern: Pattern, contexts: Sequence[Sequence[Example]],
               queries: Sequence[Example], data_fingerprint: str, topk: int,
               label_score: str = "sum") -> tuple[str, dict[str, Any]]:
    """A content hash of everything the signal depends on, and the description it was made from.

    ``teacher`` is the model's identity (``models.model_identity``: name, weights fingerprint, dtype).
    """
    description = {
        "code": signal_code_version(),
        "teacher": {k: teacher.get(k) for k in ("name", "fingerprint", "dtype", "commit")},
        "pattern": {"template": pattern.template, "label_words": list(pattern.label_words)},
        "contexts": [[d.id for d in demos] for demos in contexts],
        "queries": hashlib.sha256("\n".join(q.id for q in queries).encode()).hexdigest(),
        "n_queries": len(queries),
        "data": data_fingerprint,
        "topk": topk,
        # Whole-prompt tokenization (issue 13): entries from the separately tokenized prompts are not reused.
        "tokenization": TOKENIZATION,
        "label_score": label_score,
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]
    return key, description


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SignalCache:
    """Teacher signals on disk: ``<dir>/<key>.safetensors`` plus ``<key>.json`` (written last, with a checksum)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.safetensors", self.directory / f"{key}.json"

    def load(self, key: str, queries: Sequence[Example]) -> TeacherSignal | None:
        """The cached signal for ``key``, or None if absent, partial or corrupt (then it is recomputed).

        A meta file that is not a JSON object (``[]``, ``null``: a hand edit, another tool) counts as
        corrupt too, like a failed checksum.
        """
        tensors_path, meta_path = self.paths(key)
        if not meta_path.exists() or not tensors_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"{meta_path} holds {type(meta).__name__}, not a JSON object")
            if meta.get("sha256") != _sha256(tensors_path):
                raise ValueError("checksum mismatch")
            tensors = load_file(str(tensors_path))
            if meta.get("query_ids") != [q.id for q in queries]:
                raise ValueError("query ids differ")
            signal = TeacherSignal(meta["query_ids"], tensors["label_logprobs"], tensors.get("topk_logprobs"),
                                   tensors.get("topk_ids"), meta.get("contexts"),
                                   context_label_logprobs=tensors.get("context_label_logprobs"))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            logger.warning("teacher cache entry %s is unusable (%s); recomputing", key, exc)
            return None
        return signal

    def save(self, key: str, signal: TeacherSignal, description: dict[str, Any]) -> None:
        """Write the tensors, then the meta file with their checksum (last: it marks the entry complete).

        A failed write names the file and ``--cache-dir`` (the option that chose the directory).
        """
        tensors_path, meta_path = self.paths(key)
        tensors = {"label_logprobs": signal.label_logprobs.contiguous()}
        if signal.context_label_logprobs is not None:
            tensors["context_label_logprobs"] = signal.context_label_logprobs.contiguous()
        if signal.topk_logprobs is not None:
            tensors["topk_logprobs"] = signal.topk_logprobs.contiguous()
            tensors["topk_ids"] = signal.topk_ids.contiguous()
        atomic_write_bytes(tensors_path, tensors_to_bytes(tensors), option="--cache-dir")
        atomic_write_json(meta_path, {"key": key, "description": description, "sha256": _sha256(tensors_path),
                                      "query_ids": signal.query_ids, "contexts": signal.contexts},
                          option="--cache-dir")


class OnlineTeacher:
    """A loaded teacher that scores batches of training queries during training.

    Each demonstration context's prefix cache is computed once and reused for every batch.
    """

    def __init__(self, teacher: LoadedModel, pattern: Pattern, contexts: Sequence[Sequence[Example]],
                 label_score: str = "sum"):
        from icldistill.tasks.prompts import demonstration_prefix

        self.teacher = teacher
        self.pattern = pattern
        self.label_score = label_score
        self.prefix_texts = [demonstration_prefix(pattern, d) for d in contexts]
        # The demonstrations tokenized alone start every whole prompt but for their last token or two;
        # each batch's scoring shortens a cache to the part its prompts share (exact, see PrefixCache).
        self.prefixes = [encode_text(teacher.tokenizer, text) for text in self.prefix_texts]
        self.caches = [PrefixCache(teacher.model, p) for p in self.prefixes]

    def __call__(self, queries: Sequence[Example], topk: int = 0) -> TeacherSignal:
        texts = [self.pattern.render(q.fields) for q in queries]
        per_context = []
        for j, (text, cache) in enumerate(zip(self.prefix_texts, self.caches)):
            tokens = tokenize_prompts(self.teacher.tokenizer, text, texts, self.pattern.label_words, self.teacher.name)
            # As the cached pass does: every training query needs a target, so one too long is an error.
            too_long = [q.id for q, row, conts in zip(queries, tokens.query_ids, tokens.continuations)
                        if not fits_in_context(len(tokens.prefix_ids), row, conts, self.teacher.max_length)]
            if too_long:
                raise IcldError(f"{len(too_long)} training queries (e.g. {too_long[:3]}) do not fit "
                                f"{self.teacher.name}'s {self.teacher.max_length} tokens after the demonstrations; "
                                "lower --shots.")
            per_context.append(score_queries(self.teacher.model, tokens.prefix_ids, tokens.query_ids,
                                             tokens.continuations, batch_size=len(texts),
                                             topk=topk if j == 0 else 0, prefix_cache=cache,
                                             label_score=self.label_score))
        return TeacherSignal([q.id for q in queries], *_merge_contexts(per_context),
                             context_label_logprobs=_per_context(per_context))
