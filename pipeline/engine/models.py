"""The recurrent classifiers: each 28x28 image is read as a sequence of pixel rows (or columns).

How the network reads the digit is part of the recipe:
- view: rows (top to bottom), cols (left to right), or both: a row sweep and a column sweep, two
  recurrent stacks in one model whose features are joined before the linear layer;
- rows_per_step: k pixel rows make one time step (28/k steps of 28k pixels): fewer, wider steps
  are faster and keep more of the digit within the network's memory;
- readout: the classifier sees the last states (last), or pool: them with the mean and the max of
  every step's output over time, so what the network saw at each row reaches the classifier.

The vanilla RNN is the default cell; GRU and LSTM share the wrapper. No hidden state is built by
hand, so any batch size works and the state is made on the device of the input.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Settings

# Mean and standard deviation of MNIST pixels scaled to [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081
SIDE = 28
# The recurrent cells MODEL= names (config.py lists the same names for its choices).
CELLS: dict[str, type[nn.RNN] | type[nn.GRU] | type[nn.LSTM]] = {
    "rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentClassifier(nn.Module):
    """One recurrent stack per sweep over the image, then a linear layer on what the readout keeps."""

    def __init__(self, cfg: Settings, classes: int = 10) -> None:
        super().__init__()
        hidden, layers, view, k = cfg.hidden, cfg.layers, cfg.view, cfg.rows_per_step
        self.normalize, self.rows_per_step, self.pool = cfg.normalize, k, cfg.readout == "pool"
        self.sweeps = ("rows", "cols") if view == "both" else (view,)
        self.directions = 2 if cfg.bidirectional else 1
        extra = {"nonlinearity": cfg.nonlinearity} if cfg.model == "rnn" else {}

        def stack() -> nn.Module:
            rnn = CELLS[cfg.model](input_size=SIDE * k, hidden_size=hidden, num_layers=layers,
                                   batch_first=True, bidirectional=cfg.bidirectional,
                                   dropout=cfg.dropout if layers > 1 else 0.0, **extra)
            if cfg.orthogonal_init:
                # Orthogonal recurrent weights keep the gradient's scale through the time steps.
                for name, weight in rnn.named_parameters():
                    if name.startswith("weight_hh"):
                        for block in weight.data.split(hidden):
                            nn.init.orthogonal_(block)
            return rnn

        # The first sweep keeps the name `rnn`, so models saved before `both` existed still load.
        self.rnn = stack()
        self.rnn_cols = stack() if view == "both" else None
        features = hidden * self.directions * (3 if self.pool else 1) * len(self.sweeps)
        self.head = nn.Linear(features, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 28, 28) with pixel values 0-255, uint8 or float -> class scores (B, 10)."""
        if self.normalize:  # (x / 255 - mean) / std as one multiply and one in-place add
            x = images.float() * (1 / (255 * PIXEL_STD))
            x.add_(-PIXEL_MEAN / PIXEL_STD)
        else:
            x = images.float() / 255.0
        features = []
        for sweep, rnn in zip(self.sweeps, (self.rnn, self.rnn_cols), strict=False):
            assert rnn is not None
            # Time step t reads pixel rows (or, transposed, columns) k*t to k*t + k - 1.
            seq = x if sweep == "rows" else x.transpose(1, 2)
            features.append(self._read(rnn, seq.reshape(len(x), SIDE // self.rows_per_step, -1)))
        return self.head(torch.cat(features, 1) if len(features) > 1 else features[0])

    def _read(self, rnn: nn.Module, seq: torch.Tensor) -> torch.Tensor:
        outputs, state = rnn(seq)
        if isinstance(state, tuple):  # LSTM: (h, c)
            state = state[0]
        # state is (layers * directions, B, hidden): join the last layer's directions.
        last = state[-self.directions:].transpose(0, 1).reshape(len(seq), -1)
        if not self.pool:
            return last
        return torch.cat([last, outputs.mean(1), outputs.amax(1)], 1)


def build_model(cfg: Settings) -> nn.Module:
    """A fresh model for the settings (one per fold, never shared)."""
    return RecurrentClassifier(cfg)
