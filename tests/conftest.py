"""Shared fixtures: tiny local models built once per test session, loaded via from_pretrained."""
from __future__ import annotations

import os

import pytest

# Two CPU cores in CI: keep each test process to one intra-op thread so multi-process tests do not
# oversubscribe, and keep DeepSpeed on its CPU accelerator.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """{'tokenizer': Path, 'llm': Path, 'vision': Path}: folders in the Hugging Face layout."""
    from trainer.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny_assets"))
