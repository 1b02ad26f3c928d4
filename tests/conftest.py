"""Shared fixtures: the real data directory, tiny model directories, an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny import make_model, make_tokenizer


def shared_data_dir() -> Path:
    """../shared/data beside the checkout (as in CI), else $ICLDISTILL_DATA."""
    here = Path(__file__).resolve().parents[2] / "shared" / "data"
    if here.is_dir():
        return here
    env = os.environ.get("ICLDISTILL_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    pytest.skip("the shared data directory (../shared/data or $ICLDISTILL_DATA) is not present")


def pytest_collection_finish(session) -> None:
    """Freeze what collection imported (torch, transformers, ... : half a million objects) out of the garbage
    collector's reach. Every run calls ``gc.collect()`` before it measures memory (``runtime.records``), and each
    of those full collections walked all of them: ~0.3 s a call, three calls a run, hundreds of runs."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models gain nothing from threads and lose a lot when cores are shared; real-weight tests keep them."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models: 'teacher' and 'student' share a tokenizer; 'other' has a different vocabulary."""
    root = tmp_path_factory.mktemp("tiny-models")
    tok = make_tokenizer()
    other_tok = make_tokenizer(bos=True, vocab_size=280)
    dirs = {}
    for name, arch, seed, t in [("teacher", "llama", 1, tok), ("student", "llama", 2, tok), ("opt", "opt", 3, tok),
                                 ("gemma3", "gemma3", 4, tok), ("other", "llama", 5, other_tok)]:
        model = make_model(arch, len(t), seed=seed, max_positions=2048)
        path = root / name
        model.save_pretrained(path)
        t.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An isolated cache for teacher signals and models."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ICLDISTILL_CACHE", str(path))
    return path
