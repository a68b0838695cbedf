"""The recurrent classifiers: each 28x28 image is read as 28 time steps of 28 pixels.

With the rows view a time step is one pixel row (top to bottom); with the cols view it is one pixel
column (left to right): the same network sees the digit another way and makes other mistakes.

The vanilla RNN of the tutorial is the default; GRU and LSTM share the same wrapper. Unlike the
tutorial's model, no hidden state is built by hand, so any batch size works (1 included) and the
state is always created on the device of the input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.config import Settings

# Mean and standard deviation of MNIST pixels scaled to [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081
CELLS: dict[str, type[nn.RNN] | type[nn.GRU] | type[nn.LSTM]] = {
    "rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentClassifier(nn.Module):
    """A recurrent layer stack over the image rows, then a linear layer on the final state."""

    def __init__(self, cell: str = "rnn", hidden: int = 128, layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0, normalize: bool = True,
                 orthogonal_init: bool = True, classes: int = 10, view: str = "rows") -> None:
        super().__init__()
        self.normalize = normalize
        self.columns = view == "cols"
        self.rnn = CELLS[cell](input_size=28, hidden_size=hidden, num_layers=layers,
                               batch_first=True, bidirectional=bidirectional,
                               dropout=dropout if layers > 1 else 0.0)
        self.directions = 2 if bidirectional else 1
        self.head = nn.Linear(hidden * self.directions, classes)
        if orthogonal_init:
            # Orthogonal recurrent weights keep the gradient's scale through the 28 steps.
            for name, weight in self.rnn.named_parameters():
                if name.startswith("weight_hh"):
                    for block in weight.data.split(hidden):
                        nn.init.orthogonal_(block)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 28, 28) with pixel values 0-255, uint8 or float -> class scores (B, 10)."""
        if self.normalize:  # (x / 255 - mean) / std as one multiply and one in-place add
            x = images.float() * (1 / (255 * PIXEL_STD))
            x.add_(-PIXEL_MEAN / PIXEL_STD)
        else:
            x = images.float() / 255.0
        if self.columns:
            x = x.transpose(1, 2)  # time step t = pixel column t
        _, state = self.rnn(x)
        if isinstance(state, tuple):  # LSTM: (h, c)
            state = state[0]
        # state is (layers * directions, B, hidden): join the last layer's directions.
        last = state[-self.directions:].transpose(0, 1).reshape(len(images), -1)
        return self.head(last)


def _factory(cell: str) -> Callable[[Settings], nn.Module]:
    def build(cfg: Settings) -> nn.Module:
        return RecurrentClassifier(cell, cfg.hidden, cfg.layers, cfg.bidirectional, cfg.dropout,
                                   cfg.normalize, cfg.orthogonal_init, view=cfg.view)
    return build


MODELS: dict[str, Callable[[Settings], nn.Module]] = {name: _factory(name) for name in CELLS}


def build_model(cfg: Settings) -> nn.Module:
    """A fresh model for the config (one per fold, never shared)."""
    return MODELS[cfg.model](cfg)
