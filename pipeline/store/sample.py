"""The built-in sample: scikit-learn's real handwritten digits in the competition's CSV format.

scikit-learn ships 1,797 digits of 8x8 pixels with values 0-16. Each is resized to the 20x20 box
that MNIST uses, centred in 28x28 and scaled to 0-255, then split into a labelled train.csv and an
unlabelled test.csv. It is small and offline: good for trying the pipeline, not for the leaderboard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_TEST_ROWS = 300
SAMPLE_SEED = 0


def make_images() -> tuple[np.ndarray, np.ndarray]:
    """All sample digits as uint8 (N, 28, 28) images and their int64 labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    box = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = torch.zeros(len(small), 28, 28)
    images[:, 4:24, 4:24] = box[:, 0]
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return pixels, digits.target.astype(np.int64)


def write(train_csv: Path, test_csv: Path) -> tuple[int, int]:
    """Write the sample as train.csv and test.csv (both or neither); returns their row counts."""
    import pandas as pd

    from pipeline.store.io import replace_together, staged_files, write_csv

    pixels, labels = make_images()
    order = np.random.default_rng(SAMPLE_SEED).permutation(len(labels))
    test_rows, train_rows = order[:SAMPLE_TEST_ROWS], order[SAMPLE_TEST_ROWS:]
    flat = pixels.reshape(len(pixels), 784)
    columns = [f"pixel{k}" for k in range(784)]
    train = pd.DataFrame(flat[train_rows], columns=columns)
    train.insert(0, "label", labels[train_rows])
    test = pd.DataFrame(flat[test_rows], columns=columns)
    with staged_files(train_csv.parent, [train_csv.name, test_csv.name]) as staged:
        write_csv(staged[0], train)
        write_csv(staged[1], test)
        replace_together([(staged[0], train_csv), (staged[1], test_csv)])
    return len(train), len(test)
