"""Shared fixtures: one local Ray instance for the whole session (2 CPUs, no dashboard), real tokenizer folders."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach to a cluster left over from elsewhere
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory):
    """Meta-Llama-3-8B's tokenizer files: 128,256 tokens, no pad token, no chat template (tests/real_tokenizers.py)."""
    from real_tokenizers import llama3_tokenizer_dir

    return llama3_tokenizer_dir(tmp_path_factory.mktemp("llama3-tokenizer"))


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    """A Qwen3 tokenizer as shipped, with its own (not prefix-stable) chat template (tests/real_tokenizers.py)."""
    from real_tokenizers import qwen_tokenizer_dir

    return qwen_tokenizer_dir(tmp_path_factory.mktemp("qwen-tokenizer"))
