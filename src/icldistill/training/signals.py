"""Where a training batch's teacher signal comes from, beside the loss that scores it (DistillKit's split).

A :class:`SignalSource` answers "what does the teacher, shown its demonstrations, say about these training
rows?": :class:`CachedSource` reads the rows of a signal computed once before training (see
:class:`CachedTeacherPass`), :class:`OnlineSource` asks a loaded teacher batch by batch. The loss
(``losses``) only ever sees the answer. :class:`TeacherSpec` is the one place the teacher's identity is
spelled (name, revision, dtype, trust_remote_code), so every load of its tokenizer, config, identity or
weights agrees.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from icldistill.errors import ConfigError
from icldistill.models.loading import LoadedModel, load_model, load_tokenizer, logit_width, model_identity
from icldistill.runtime import distributed
from icldistill.runtime.paths import default_cache_dir
from icldistill.tasks.data import Example
from icldistill.tasks.prompts import Pattern
from icldistill.training.contexts import tempered_context_average
from icldistill.training.teacher import OnlineTeacher, SignalCache, TeacherSignal, compute_signal, signal_key


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher's identity and where it loads: every load of it (tokenizer, config, identity, weights) reads this."""

    name: str
    revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    device: str = "auto"
    cache_dir: Path | None = None

    @classmethod
    def from_options(cls, config: Any) -> TeacherSpec:
        """From a distillation config (``teacher``, ``teacher_revision``, ``teacher_dtype`` and the common options)."""
        return cls(config.teacher, config.teacher_revision, config.teacher_dtype, config.trust_remote_code,
                   config.device, config.cache_dir)

    def tokenizer(self) -> Any:
        return load_tokenizer(self.name, cache_dir=self.cache_dir, revision=self.revision,
                              trust_remote_code=self.trust_remote_code)

    def logit_width(self) -> int:
        """The width of the teacher's logits, from its config alone (no weights)."""
        return logit_width(self.name, cache_dir=self.cache_dir, revision=self.revision,
                           trust_remote_code=self.trust_remote_code)

    def identity(self) -> dict[str, Any]:
        """Name, weights fingerprint and dtype, without loading the weights (the cache key's teacher)."""
        return model_identity(self.name, dtype=self.dtype, device=self.device, cache_dir=self.cache_dir,
                              revision=self.revision)

    def load(self) -> LoadedModel:
        return load_model(self.name, dtype=self.dtype, device=self.device, cache_dir=self.cache_dir,
                          revision=self.revision, trust_remote_code=self.trust_remote_code)

    def check_topk(self, topk: int) -> None:
        """``--teacher-topk`` must not exceed the teacher's vocabulary (read from its config, before any weights)."""
        width = self.logit_width()
        if topk > width:
            raise ConfigError(f"--teacher-topk {topk} exceeds the teacher {self.name}'s vocabulary of {width} tokens; "
                              f"use --teacher-topk {width} or less.")


@dataclass(frozen=True)
class TeacherPrompts:
    """How the teacher is prompted and scored: the pattern, the label score, and the data it is keyed on."""

    pattern: Pattern
    label_score: str = "sum"
    data_fingerprint: str = ""


class SignalSource(Protocol):
    """The teacher's answers for the training rows at ``indices`` (positions in the training queries)."""

    def __call__(self, indices: Sequence[int]) -> TeacherSignal: ...


@dataclass
class CachedSource:
    """The rows of a signal computed before training that belong to a training batch."""

    signal: TeacherSignal
    queries: Sequence[Example]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {qid: i for i, qid in enumerate(self.signal.query_ids)}

    def __call__(self, indices: Sequence[int]) -> TeacherSignal:
        return self.signal.rows(torch.tensor([self._index[self.queries[i].id] for i in indices]))


@dataclass
class OnlineSource:
    """The online teacher's answers for a training batch (its prefix caches are kept across batches).

    ``topk`` > 0 asks for the teacher's top-k next-token log-probabilities (vocabulary KL); ``vocab`` > 0
    keeps only the ids below it (:func:`within_vocab`).
    """

    online: OnlineTeacher
    queries: Sequence[Example]
    topk: int = 0
    vocab: int = 0

    @classmethod
    def start(cls, teacher: LoadedModel, prompts: TeacherPrompts, contexts: Sequence[Sequence[Example]],
              queries: Sequence[Example], vocab_kl: bool) -> OnlineSource:
        """For vocabulary KL, the teacher's whole next-token distribution, within its real vocabulary."""
        width = teacher.model.get_output_embeddings().weight.shape[0] if vocab_kl else 0
        return cls(OnlineTeacher(teacher, prompts.pattern, contexts, prompts.label_score), queries, width,
                   len(teacher.tokenizer) if width else 0)

    def __call__(self, indices: Sequence[int]) -> TeacherSignal:
        with torch.no_grad():
            found = self.online([self.queries[i] for i in indices], topk=self.topk)
        return within_vocab(found, self.vocab) if self.vocab else found


def within_vocab(signal: TeacherSignal, vocab: int) -> TeacherSignal:
    """Keep only the token ids below ``vocab`` (the tokenizer's real vocabulary) of a whole-width top-k.

    Embedding matrices are often padded past the tokenizer; those rows are no token, and a KL that gave
    them mass would teach the student nothing real. The loss renormalises over what is kept.
    """
    if signal.topk_ids is None or signal.topk_ids.shape[-1] == vocab:
        return signal
    keep = signal.topk_ids < vocab
    n = signal.topk_ids.shape[0]
    signal.topk_logprobs = signal.topk_logprobs[keep].view(n, vocab)
    signal.topk_ids = signal.topk_ids[keep].view(n, vocab)
    return signal


def tempered_targets(signal: TeacherSignal, temperature: float) -> torch.Tensor:
    """(batch, C) the teacher's tempered label distribution, each context tempered before averaging."""
    if signal.context_label_logprobs is not None and signal.context_label_logprobs.shape[0] > 1:
        return tempered_context_average(signal.context_label_logprobs, temperature)
    return torch.log_softmax(signal.label_logprobs / temperature, -1)


def signal_cache(cache_dir: Path | str | None) -> SignalCache:
    """The teacher-signal cache under ``--cache-dir`` (or the default cache directory)."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return SignalCache(base / "teacher")


class CachedTeacherPass:
    """The cached teacher pass: each signal read from the cache, or computed once and stored there.

    The key needs the teacher's identity, not its weights, so a run whose signals are all cached never
    loads the teacher; the first miss loads it (kept for later misses until :meth:`release`). Under N
    processes rank 0 reads the cache and hands the signal to every rank; on a miss every rank loads the
    teacher, scores its share of the queries, and rank 0 stores the gathered signal.
    """

    def __init__(self, spec: TeacherSpec, prompts: TeacherPrompts, cache: SignalCache, *, batch_size: int,
                 use_prefix_cache: bool, progress: bool):
        self.spec, self.prompts, self.cache = spec, prompts, cache
        self.batch_size, self.use_prefix_cache, self.progress = batch_size, use_prefix_cache, progress
        self.identity = spec.identity()
        self.teacher: LoadedModel | None = None
        self.loaded = False

    def signal(self, contexts: Sequence[Sequence[Example]], queries: Sequence[Example],
               topk: int = 0) -> tuple[TeacherSignal, str, bool]:
        """The signal, its cache key, and whether it was a cache hit."""
        p = self.prompts
        key, description = signal_key(self.identity, p.pattern, contexts, queries, p.data_fingerprint, topk,
                                      label_score=p.label_score)
        found = distributed.broadcast(self.cache.load(key, queries) if distributed.is_main() else None)
        if found is not None:
            return found, key, True
        if self.teacher is None:
            self.teacher, self.loaded = self.spec.load(), True
        found = compute_signal(self.teacher, p.pattern, contexts, queries, batch_size=self.batch_size, topk=topk,
                               label_score=p.label_score, use_prefix_cache=self.use_prefix_cache,
                               progress=self.progress)
        if distributed.is_main():
            self.cache.save(key, found, description)
        return found, key, False

    def release(self) -> None:
        """Free the teacher before training starts."""
        self.teacher = None
        gc.collect()
