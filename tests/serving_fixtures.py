"""Fixtures the serving tests share: import them into a test module to use them."""

import pytest
import torch

from ar_course.transformer import GPT, GPTConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small engine steps are all overhead: one torch thread is fastest, and steady on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> GPT:
    """A 2-layer GPT over 17 tokens, seeded."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=17, block_size=64, n_layer=2, n_head=2, n_embd=16)).eval()
