"""The serving engine on a CUDA device (run by ``make gpu-report``). A file of its own: the GPU machine has no
``hypothesis``, which test_serving.py imports, and a file that fails to import runs none of its tests."""

import pytest
import torch

from ar_course.transformer import GPT
from serving_fixtures import _one_thread, seeded_outputs_one_at_a_time_and_batched, tiny  # noqa: F401 (fixtures)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seeded_requests_sample_on_a_cuda_engine_whatever_the_batch(tiny):
    """A request's seed makes a generator on the engine's device (a CPU generator cannot draw CUDA numbers)."""
    model = GPT(tiny.config).to("cuda").eval()
    model.load_state_dict(tiny.state_dict())
    alone, batched = seeded_outputs_one_at_a_time_and_batched(model)
    assert alone == batched and all(len(o) == 6 for o in alone)
