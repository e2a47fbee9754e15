"""Train a tiny model with ar_course.train.train_loop; run alone or under torchrun (see test_distributed.py).

Usage: python ddp_worker.py OUT.safetensors"""

import sys

import torch

from ar_course import distributed as ddp
from ar_course.checkpoint import save_checkpoint
from ar_course.train import TrainConfig, train_loop


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def global_batches():
    g = torch.Generator().manual_seed(1)
    while True:  # the same global batches in every process
        yield torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def main(out: str) -> None:
    torch.set_num_threads(1)
    ddp.init_distributed()
    model = make_model()
    loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    history = train_loop(model, loss_fn, global_batches(), TrainConfig(steps=20, lr=1e-2, warmup=2), progress=False)
    if ddp.is_main_process():
        save_checkpoint(out, model, {"world_size": ddp.world_size()}, final_loss=history.loss[-1])
    ddp.close_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
