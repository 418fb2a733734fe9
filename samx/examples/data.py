"""scikit-learn's bundled digits data with symmetric label noise (no download)."""

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A train/test split; features standardised with the training statistics.

    Attributes:
      x_train: float32 ``(n_train, 64)``.
      y_train: int32 ``(n_train,)``, with label noise.
      x_test: float32 ``(n_test, 64)``.
      y_test: int32 ``(n_test,)``, clean.
      clean_train: int32 ``(n_train,)``, the training labels before noise.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    clean_train: np.ndarray


def symmetric_noise(
    labels: np.ndarray, noise: float, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Replaces a fraction ``noise`` of labels by a different class, uniformly.

    Args:
      labels: int labels in ``[0, num_classes)``.
      noise: the fraction of labels to corrupt, in ``[0, 1]``.
      num_classes: the number of classes.
      rng: the random generator.

    Returns:
      The noisy labels; exactly ``round(noise * len(labels))`` of them differ
      from ``labels``.

    Examples:
      >>> import numpy as np
      >>> y = np.zeros(10, np.int32)
      >>> noisy = symmetric_noise(y, 0.4, 10, np.random.default_rng(0))
      >>> int((noisy != y).sum())
      4
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"`noise` must be in [0, 1], got {noise}.")
    labels = np.asarray(labels)
    flip = rng.permutation(len(labels))[: round(noise * len(labels))]
    shift = rng.integers(1, num_classes, size=len(flip))
    noisy = labels.copy()
    noisy[flip] = (labels[flip] + shift) % num_classes
    return noisy.astype(np.int32)


def load_digits(
    noise: float = 0.4, seed: int = 0, test_fraction: float = 0.25
) -> Dataset:
    """The 8x8 digits (1797 images, 10 classes), split and with noisy labels.

    Args:
      noise: the fraction of training labels replaced by a wrong class.
      seed: seeds the split and the noise.
      test_fraction: the share of examples held out (their labels stay clean).

    Returns:
      A :class:`Dataset`.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    x, y = _load(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    rng = np.random.default_rng(seed)
    return Dataset(
        x_train=x_train.astype(np.float32),
        y_train=symmetric_noise(y_train, noise, 10, rng),
        x_test=x_test.astype(np.float32),
        y_test=y_test.astype(np.int32),
        clean_train=y_train.astype(np.int32),
    )
