"""Fixtures the serving tests share: import them into a test module to use them."""

import pytest
import torch

from ar_course.sampling import SamplingConfig
from ar_course.serving import Engine, EngineConfig
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


def seeded_outputs_one_at_a_time_and_batched(model: GPT) -> list[list[list[int]]]:
    """Four seeded, sampled requests run with at most 1 and 4 sequences per batch: the outputs of each run."""
    s = SamplingConfig(temperature=1.0, top_k=5)
    outs = []
    for running in (1, 4):
        engine = Engine(model, EngineConfig(num_blocks=32, block_size=4, max_running=running))
        ids = [engine.add_request([1, 2, i], 6, sampling=s, seed=i) for i in range(4)]
        out = engine.run()
        outs.append([out[i] for i in ids])
    return outs
