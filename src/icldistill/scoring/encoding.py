"""Whole-prompt tokenization: prompts as the strings a user would write, their shared token prefix, label words.

Every prompt (demonstrations + query) is tokenized as one string, as lm-evaluation-harness and a user's
own ``tokenizer(prompt)`` do: tokenizing the demonstrations and the query apart and joining the ids feeds
a BPE model a blank line it rarely saw (``ĊĊ`` + ``The`` instead of ``Ċ``, ``Ċ``, ``The`` for SmolLM2) and
shifts label log-probabilities by about 0.15 nats (issue 13). The prompts of one context then share a
long token prefix (the demonstrations up to their last token or two): the KV cache holds that prefix,
and each query carries the tokens after it.

A label word is a continuation of the prompt, split as lm-eval's ``_encode_pair`` splits it: encode
context + word whole; the word's tokens are those after the context's own tokens (a trailing space of
the context moves to the word first). A class's score is the sum (or mean) of their log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from icldistill.errors import PromptError


def start_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. Gemma's BOS), never those after it.

    A tokenizer that appends EOS would otherwise put EOS between the demonstrations and the query, or
    between the query and its answer (issue 12); the answer follows the prompt text directly.
    """
    probe = "a b"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(without) + 1):
        if with_special[i : i + len(without)] == without:
            return with_special[:i]
    # The text itself encodes differently with special tokens (e.g. an added prefix space): keep a leading BOS.
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and with_special[:1] == [bos] else []


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one whole prompt: the start tokens, then the text (no trailing special tokens)."""
    return start_tokens(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_many(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    start = start_tokens(tokenizer)
    return [start + list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def label_word_tokens(tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str],
                      model_name: str = "the model") -> list[list[int]]:
    """The tokens of each label word on its own; words of several tokens are fine.

    Empty words, repeated words and two words with identical tokens are errors: such classes cannot be
    told apart by their scores.
    """
    words = list(label_words)
    if any(not w or not w.strip() for w in words):
        raise PromptError(f"Label words must be non-empty, got {words}; fix --label-words or the task's label words.")
    if len(set(words)) != len(words):
        raise PromptError(f"Label words must be distinct, got {words}; fix --label-words or the task's label words.")
    tokens = [list(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
    _check_distinct(tokens, words, model_name)
    return tokens


def _check_distinct(tokens: Sequence[Sequence[int]], words: Sequence[str], model_name: str) -> None:
    seen: dict[tuple[int, ...], str] = {}
    for word, ids in zip(words, tokens):
        if not ids:
            raise PromptError(f"Label word {word!r} has no tokens for {model_name}; choose another word.")
        key = tuple(ids)
        if key in seen:
            raise PromptError(f"Label words {seen[key]!r} and {word!r} tokenize identically for {model_name}; "
                              "choose words that differ.")
        seen[key] = word


def label_token_ids(tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str],
                    model_name: str = "the model") -> list[int]:
    """The single token id of each label word, for callers that need one next-token id per class.

    Scoring itself takes words of any length (``label_word_tokens``); this helper stays for the
    one-position uses (e.g. vocabulary KL) and says so when a word is several tokens.
    """
    tokens = label_word_tokens(tokenizer, label_words, model_name)
    for word, ids in zip(label_words, tokens):
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise PromptError(
                f"Label word {word!r} is {len(ids)} tokens for {model_name} ({pieces}); this needs single tokens. "
                "Scoring and label-space distillation accept words of several tokens; choose single-token words "
                "for the next-token (vocabulary) uses."
            )
    return [ids[0] for ids in tokens]


def matching_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row, at most the shortest row's length minus one.

    Every row keeps at least one token of its own, so each query has an answer position after the prefix.
    """
    if not rows:
        return 0
    first = rows[0]
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return max(n, 0)


@dataclass
class PromptTokens:
    """The prompts of one context, tokenized whole and split at their shared prefix.

    ``prompts[i] == prefix_ids + query_ids[i]``; ``continuations[i][c]`` are the tokens of class c's
    label word after prompt i (non-empty).
    """

    prefix_ids: list[int]
    query_ids: list[list[int]]
    continuations: list[list[list[int]]]


def split_continuation(context: str, word: str) -> tuple[str, str]:
    """lm-eval's split: a context's trailing whitespace belongs to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + word
    return context, word


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prefix_text: str, query_texts: Sequence[str],
                     label_words: Sequence[str], model_name: str = "the model") -> PromptTokens:
    """Tokenize ``prefix_text + q`` for every query whole, and each label word as its continuation.

    The shared prefix is the longest token prefix common to every prompt (not the demonstrations
    tokenized alone, whose last tokens can differ from the whole prompt's).
    """
    label_word_tokens(tokenizer, label_words, model_name)  # empty / duplicate / identical words fail here
    if not query_texts:
        return PromptTokens(encode_text(tokenizer, prefix_text), [], [])
    pairs = [[split_continuation(prefix_text + q, w) for w in label_words] for q in query_texts]
    contexts = [row[0][0] for row in pairs]  # the split depends on the context alone: the same for every word
    prompts = _encode_many(tokenizer, contexts)
    wholes = _encode_many(tokenizer, [c + w for row in pairs for c, w in row])
    n_classes = len(label_words)
    continuations = []
    for i, prompt in enumerate(prompts):
        conts = [wholes[i * n_classes + c][len(prompt):] for c in range(n_classes)]
        _check_distinct(conts, label_words, model_name)
        continuations.append(conts)
    p = common_prefix_length(prompts)
    return PromptTokens(prompts[0][:p], [prompt[p:] for prompt in prompts], continuations)


def scored_length(prefix_length: int, query_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> int:
    """Tokens the model reads to score one prompt: the prefix, the query and its longest label word but for
    that word's last token (whose log-probability is read at the position before it)."""
    return prefix_length + len(query_ids) + max(len(c) for c in continuations) - 1


def fits_in_context(prefix_length: int, query_ids: Sequence[int], continuations: Sequence[Sequence[int]],
                    max_length: int) -> bool:
    """Whether a prompt and every label word after it fit a model of ``max_length`` positions: the one
    rule for evaluation (rows that do not fit are dropped and counted), teacher signals and training rows."""
    return scored_length(prefix_length, query_ids, continuations) <= max_length
