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

    x, y = _load(return_X_y=True)
    return split(x, y, 10, noise=noise, seed=seed, test_fraction=test_fraction)


def split(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    noise: float,
    seed: int,
    test_fraction: float,
) -> Dataset:
    """A stratified split, standardised features, noise on the training labels.

    The features are standardised with the training statistics; ``seed``
    seeds the split and then the noise.
    """
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    rng = np.random.default_rng(seed)
    return Dataset(
        x_train=x_train.astype(np.float32),
        y_train=symmetric_noise(y_train, noise, num_classes, rng),
        x_test=x_test.astype(np.float32),
        y_test=y_test.astype(np.int32),
        clean_train=y_train.astype(np.int32),
    )


def read_ts(path) -> tuple[np.ndarray, np.ndarray]:
    """Reads an equal-length time-series file in the ``.ts`` format.

    The format of the UEA/UCR archives (and of the files aeon and sktime ship):
    ``#`` comments and ``@`` headers, then after ``@data`` one example per
    line, its channels separated by ``:`` and each channel's values by ``,``;
    the last field is the class label.

    Args:
      path: the file.

    Returns:
      ``(x, labels)``: float32 ``(n, channels, length)`` and the labels as
      strings ``(n,)``.

    Examples:
      >>> import pathlib, tempfile
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny.ts"
      >>> text = "#c\\n@problemName tiny\\n@data\\n1,2:3,4:a\\n5,6:7,8:b\\n"
      >>> _ = path.write_text(text)
      >>> x, labels = read_ts(path)
      >>> x.shape, labels.tolist()
      ((2, 2, 2), ['a', 'b'])
    """
    rows, labels = [], []
    with open(path) as f:
        in_data = False
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                in_data = line.lower().startswith("@data")
                continue
            *channels, label = line.split(":")
            rows.append([[float(v) for v in c.split(",")] for c in channels])
            labels.append(label.strip())
    if not rows:
        raise ValueError(f"{path}: no examples after an `@data` line.")
    try:
        x = np.asarray(rows, np.float32)
    except ValueError as err:
        raise ValueError(
            f"{path}: the examples differ in channels or length; `read_ts`"
            " reads equal-length files only."
        ) from err
    return x, np.asarray(labels)


def aeon_data_dir(name: str):
    """The folder of one of the datasets that the ``aeon`` package ships.

    Found without importing aeon (its import is slow): ``pip install aeon``
    (or ``samx[benchmarks]``) puts the files there; nothing is downloaded.
    """
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The {name} data ships with the `aeon` package: `pip install aeon`"
            " (or `pip install -e '.[benchmarks]'`)."
        )
    return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def load_japanese_vowels(
    noise: float = 0.4, seed: int = 0, test_fraction: float = 0.4, root=None
) -> Dataset:
    """Japanese Vowels: 640 utterances of 9 speakers, 12 channels x 25 steps.

    Real speech (UCI; Kudo, Toyama, Shimbo 1999): 12 LPC cepstrum
    coefficients of two Japanese vowels, resampled to 25 steps (the archive's
    equal-length version), and the speaker as the class. The archive's train
    and test files (270 + 370) are pooled and split again per seed, like
    :func:`load_digits`; the features are flattened (300) and standardised
    with the training statistics.

    Args:
      noise: the fraction of training labels replaced by a wrong class.
      seed: seeds the split and the noise.
      test_fraction: the share of examples held out (their labels stay clean).
      root: the folder with ``JapaneseVowels_eq_{TRAIN,TEST}.ts``; default
        the copy the ``aeon`` package ships (:func:`aeon_data_dir`).

    Returns:
      A :class:`Dataset`.
    """
    import pathlib

    root = pathlib.Path(root) if root is not None else aeon_data_dir("JapaneseVowels")
    parts = [read_ts(root / f"JapaneseVowels_eq_{s}.ts") for s in ("TRAIN", "TEST")]
    x = np.concatenate([p[0] for p in parts]).reshape(-1, parts[0][0][0].size)
    names, y = np.unique(np.concatenate([p[1] for p in parts]), return_inverse=True)
    return split(x, y, len(names), noise=noise, seed=seed, test_fraction=test_fraction)
