"""Tiny models and tokenizers built in code, so the default test suite needs no weights and no network."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the a cat dog man woman doctor lawyer artist student saw helped called believed thought "
    "that who and or not is was ran slept happy sad quickly because if question answer "
    "Yes No True False positive negative great terrible review sentiment N/A"
).split()


def corpus(n_lines: int = 400) -> list[str]:
    """A deterministic toy corpus in which every label word appears often, with and without a space."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n_lines):
        idx = torch.randint(len(WORDS), (12,), generator=g).tolist()
        lines.append(" ".join(WORDS[i] for i in idx) + " ? answer: Yes No True False.\n\nquestion: positive negative")
    return lines


def make_tokenizer(bos: bool = False, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in well under a second; with ``bos`` it prepends <s> like Gemma."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_model(arch: str, vocab_size: int, seed: int = 0, max_positions: int = 512):
    """A 2-3 layer randomly initialised causal LM of the given family, in fp32 eval mode."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    elif arch == "opt":
        config = OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=max_positions, word_embed_proj_dim=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = OPTForCausalLM(config)
    elif arch == "gemma3":
        # A sliding window shorter than the prompts, so the cached path must respect it.
        config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=8,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(arch)
    return model.eval()


def toy_training_problem(arch: str = "llama", seed: int = 0, tie: bool = False):
    """A tiny model in train mode, and a fixed set of 8 token sequences with binary targets on two tokens.

    Returns ``(model, make_batch, loss_fn)`` for ``training.loop.fit``; ``tie`` makes the LM head the input
    embedding (as in SmolLM2 and Gemma).
    """
    from icldistill.training.losses import LossOutput

    tok = make_tokenizer()
    model = make_model(arch, len(tok), seed=seed)
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (8, 6), generator=g)
    labels = torch.tensor([0, 1] * 4)

    def make_batch(indices):
        return {"input_ids": ids[list(indices)], "labels": labels[list(indices)], "n_tokens": 6 * len(indices)}

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], logits_to_keep=1).logits[:, -1, 5:7]
        ce = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return LossOutput(ce, None, ce.detach())

    return model.train(), make_batch, loss_fn


def make_merging_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE that, like SmolLM2's, has a single token for a blank line at the end of a text.

    Trained on texts that end in a blank line, so ``"...\\n\\n"`` alone ends in ``ĊĊ`` while the same
    characters before a word split into ``Ċ``, ``Ċ``: the demonstrations tokenized alone then differ
    from the whole prompt at the boundary, and queries that start with a space keep ``ĊĊ``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line.replace("\n\nquestion:", " question:") + "\n\n" for line in corpus()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
