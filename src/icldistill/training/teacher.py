"""Where the teacher's signal comes from: computed online, or computed once and read from a cache.

*How* the signal is scored (the loss) lives in ``losses``; this module only answers "what does the
teacher, shown these demonstrations, say about these queries?" (the DistillKit split of signals and
losses). The teacher is frozen and its demonstrations are fixed, so its answer to each training query
is a constant: the cached signal is computed once per (teacher, pattern, demonstrations, queries,
code version), stored under the cache directory, and every later run with the same key reuses it and
never loads the teacher. A partial or corrupt file is detected by its checksum and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes

from icldistill.runtime import distributed
from icldistill.tasks.data import Example
from icldistill.errors import IcldError
from icldistill.scoring.evalsets import encode_prompts
from icldistill.models.loading import LoadedModel
from icldistill.tasks.prompts import Pattern
from icldistill.runtime.records import atomic_write_bytes, atomic_write_json
from icldistill.scoring.prefix_cache import PrefixCache, Scores, encode_queries, label_token_ids, score_queries, score_queries_sharded

logger = logging.getLogger(__name__)

SIGNAL_VERSION = 1  # bump when the way signals are computed changes: old cache entries stop matching


@dataclass
class TeacherSignal:
    """The teacher's answers for the training queries, in query order.

    label_logprobs (n, C): log of the class distribution over the label words, averaged (in
    probability space) over the demonstration contexts. topk_logprobs / topk_ids (n, k): the
    teacher's top-k next-token log-probabilities of the first context (vocabulary KL), or None.
    """

    query_ids: list[str]
    label_logprobs: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    contexts: list[list[str]] | None = None  # demonstration ids of each context
    dropped: int = 0


def _context_average(per_context: list[torch.Tensor]) -> torch.Tensor:
    """log(mean_j p_j) of label-word distributions renormalised over the labels, (n, C)."""
    stacked = torch.stack([lp - torch.logsumexp(lp, dim=-1, keepdim=True) for lp in per_context])
    return torch.logsumexp(stacked, dim=0) - math.log(len(per_context))


def _merge_contexts(per_context: Sequence[Scores]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(context-averaged label log-probs, top-k log-probs, top-k ids); top-k come from the first context."""
    first = per_context[0]
    return _context_average([s.label_logprobs for s in per_context]), first.topk_logprobs, first.topk_ids


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
        label_ids = label_token_ids(teacher.tokenizer, pattern.label_words, teacher.name)
        # Under N processes each rank scores its shard of the queries; every rank gets the whole signal.
        with tqdm(total=distributed.shard_size(len(queries)), desc=f"teacher context {j}", unit="q",
                  disable=not progress or not distributed.is_main(), leave=False) as bar:
            scores = score_queries_sharded(teacher.model, encoded.prefix_ids, encoded.query_ids, label_ids,
                                           batch_size=batch_size, use_prefix_cache=use_prefix_cache,
                                           topk=topk if j == 0 else 0, on_batch=bar.update)
        per_context.append(scores)
    return TeacherSignal([q.id for q in queries], *_merge_contexts(per_context),
                         [[d.id for d in demos] for demos in contexts])


def signal_key(teacher: dict[str, Any], pattern: Pattern, contexts: Sequence[Sequence[Example]],
               queries: Sequence[Example], data_fingerprint: str, topk: int) -> tuple[str, dict[str, Any]]:
    """A content hash of everything the signal depends on, and the description it was made from.

    ``teacher`` is the model's identity (``models.model_identity``: name, weights fingerprint, dtype).
    """
    description = {
        "version": SIGNAL_VERSION,
        "teacher": {k: teacher[k] for k in ("name", "fingerprint", "dtype")},
        "pattern": {"template": pattern.template, "label_words": list(pattern.label_words)},
        "contexts": [[d.id for d in demos] for demos in contexts],
        "queries": hashlib.sha256("\n".join(q.id for q in queries).encode()).hexdigest(),
        "n_queries": len(queries),
        "data": data_fingerprint,
        "topk": topk,
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
        """The cached signal for ``key``, or None if absent, partial or corrupt (then it is recomputed)."""
        tensors_path, meta_path = self.paths(key)
        if not meta_path.exists() or not tensors_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != _sha256(tensors_path):
                raise ValueError("checksum mismatch")
            tensors = load_file(str(tensors_path))
            if meta.get("query_ids") != [q.id for q in queries]:
                raise ValueError("query ids differ")
        except (OSError, ValueError, KeyError, SafetensorError, json.JSONDecodeError) as exc:
            logger.warning("teacher cache entry %s is unusable (%s); recomputing", key, exc)
            return None
        return TeacherSignal(meta["query_ids"], tensors["label_logprobs"], tensors.get("topk_logprobs"),
                             tensors.get("topk_ids"), meta.get("contexts"))

    def save(self, key: str, signal: TeacherSignal, description: dict[str, Any]) -> None:
        tensors_path, meta_path = self.paths(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {"label_logprobs": signal.label_logprobs.contiguous()}
        if signal.topk_logprobs is not None:
            tensors["topk_logprobs"] = signal.topk_logprobs.contiguous()
            tensors["topk_ids"] = signal.topk_ids.contiguous()
        atomic_write_bytes(tensors_path, tensors_to_bytes(tensors))
        atomic_write_json(meta_path, {"key": key, "description": description, "sha256": _sha256(tensors_path),
                                      "query_ids": signal.query_ids, "contexts": signal.contexts})


class OnlineTeacher:
    """A loaded teacher that scores batches of training queries during training.

    Each demonstration context's prefix cache is computed once and reused for every batch.
    """

    def __init__(self, teacher: LoadedModel, pattern: Pattern, contexts: Sequence[Sequence[Example]]):
        from icldistill.tasks.prompts import demonstration_prefix
        from icldistill.scoring.prefix_cache import encode_prefix

        self.teacher = teacher
        self.pattern = pattern
        self.label_ids = label_token_ids(teacher.tokenizer, pattern.label_words, teacher.name)
        self.prefixes = [encode_prefix(teacher.tokenizer, demonstration_prefix(pattern, d)) for d in contexts]
        self.caches = [PrefixCache(teacher.model, p) for p in self.prefixes]

    def __call__(self, queries: Sequence[Example], topk: int = 0) -> TeacherSignal:
        texts = [self.pattern.render(q.fields) for q in queries]
        ids = encode_queries(self.teacher.tokenizer, texts)
        per_context = [
            score_queries(self.teacher.model, prefix, ids, self.label_ids, batch_size=len(ids),
                          topk=topk if j == 0 else 0, prefix_cache=cache)
            for j, (prefix, cache) in enumerate(zip(self.prefixes, self.caches))
        ]
        return TeacherSignal([q.id for q in queries], *_merge_contexts(per_context))
