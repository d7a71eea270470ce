"""One flat parameter buffer with named views in PyTorch's layout.

Every backend keeps the parameters of a model (stacked LSTM + linear head) in
ONE contiguous 1-D array, so the optimizer is a single pass over a single
buffer and a state dict is just a set of views into it.  The names, shapes and
gate order (i, f, g, o) are exactly those of ``torch.nn.LSTM(batch_first=True)``
followed by ``torch.nn.Linear``: ``lstm.weight_ih_l0``, ``lstm.weight_hh_l0``,
``lstm.bias_ih_l0``, ``lstm.bias_hh_l0``, ..., ``head.weight``, ``head.bias``; a
bidirectional network adds ``lstm.weight_ih_l0_reverse``, ... after each layer's own.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ParamLayout"]


class ParamLayout:
    """Names, shapes and offsets of the parameters of an LSTM + linear head.

    Parameters
    ----------
    input_size : int
        Number of inputs per time step of the first layer.
    hidden_size : int
        Number of hidden units ``H`` of every LSTM layer.
    num_layers : int
        Number of stacked LSTM layers.
    output_size : int
        Number of outputs of the linear head (classes, or regression targets).
    bidirectional : bool
        Every layer also runs backwards in time (parameters ``..._reverse``); the
        layer above and the head read both directions, ``2 * hidden_size`` values.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, output_size: int,
                 bidirectional: bool = False):
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("output_size", output_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.output_size = int(output_size)
        self.bidirectional = bool(bidirectional)

        H = self.hidden_size
        D = 2 if self.bidirectional else 1
        shapes = {}
        for k in range(self.num_layers):
            in_k = self.input_size if k == 0 else D * H
            for suffix in ("", "_reverse")[:D]:
                shapes[f"lstm.weight_ih_l{k}{suffix}"] = (4 * H, in_k)
                shapes[f"lstm.weight_hh_l{k}{suffix}"] = (4 * H, H)
                shapes[f"lstm.bias_ih_l{k}{suffix}"] = (4 * H,)
                shapes[f"lstm.bias_hh_l{k}{suffix}"] = (4 * H,)
        shapes["head.weight"] = (self.output_size, D * H)
        shapes["head.bias"] = (self.output_size,)
        self.shapes = shapes

        self.offsets = {}
        offset = 0
        for name, shape in shapes.items():
            self.offsets[name] = offset
            offset += math.prod(shape)
        self.size = offset

    def __repr__(self):
        return (f"ParamLayout(input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"num_layers={self.num_layers}, output_size={self.output_size}"
                + (", bidirectional=True)" if self.bidirectional else ")"))

    def __eq__(self, other):
        return isinstance(other, ParamLayout) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def key(self):
        return (self.input_size, self.hidden_size, self.num_layers, self.output_size,
                self.bidirectional)

    def views(self, flat):
        """Named views into ``flat`` (NumPy or CuPy), without copying."""
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise ValueError(f"expected a flat buffer of {self.size} values, got shape {flat.shape}")
        out = {}
        for name, shape in self.shapes.items():
            start = self.offsets[name]
            out[name] = flat[start:start + math.prod(shape)].reshape(shape)
        return out

    def layer(self, views, k, reverse=False):
        """``(weight_ih, weight_hh, bias_ih, bias_hh)`` of layer ``k`` from ``views`` (of its
        backward-in-time direction where ``reverse``)."""
        suffix = "_reverse" if reverse else ""
        return (views[f"lstm.weight_ih_l{k}{suffix}"], views[f"lstm.weight_hh_l{k}{suffix}"],
                views[f"lstm.bias_ih_l{k}{suffix}"], views[f"lstm.bias_hh_l{k}{suffix}"])

    def init(self, random_state=None, dtype=np.float32):
        """A new flat NumPy buffer initialised as PyTorch does.

        Every LSTM weight and bias is drawn from ``U(-1/sqrt(H), 1/sqrt(H))``, PyTorch's
        ``nn.LSTM`` default; the head's weight and bias from ``U(-1/sqrt(F), 1/sqrt(F))``
        with ``F`` its fan-in (``H``, or ``2H`` when bidirectional), what ``nn.Linear``'s
        Kaiming-uniform default amounts to.
        """
        rng = random_state if isinstance(random_state, np.random.Generator) \
            else np.random.default_rng(random_state)
        bound = 1.0 / math.sqrt(self.hidden_size)
        flat = rng.uniform(-bound, bound, size=self.size)
        if self.bidirectional:  # the same draws, scaled to the head's fan-in of 2H
            start = self.offsets["head.weight"]
            flat[start:] *= math.sqrt(0.5)
        return flat.astype(dtype)

    def from_state_dict(self, state, dtype=np.float32):
        """A flat NumPy buffer filled from a ``{name: array}`` mapping (checked)."""
        missing = [n for n in self.shapes if n not in state]
        extra = [n for n in state if n not in self.shapes]
        if missing or extra:
            raise ValueError(f"state dict does not match {self!r}: missing {missing}, unexpected {extra}")
        flat = np.empty(self.size, dtype=dtype)
        views = self.views(flat)
        for name, shape in self.shapes.items():
            value = np.asarray(state[name])
            if value.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {value.shape}")
            views[name][...] = value
        return flat
