"""What the network is, and the one program that runs it.

:class:`ModelSpec` says what the network is.  :func:`forward` and :func:`backward`
compose it, once for every backend, from the primitives a backend implements (the
protocol :class:`Ops`): one recurrence of one LSTM layer over one direction on a set
of rows, the readout of each row's last hidden state, the linear head.  A backend
decides how fast each piece runs and where its buffers live (the CPU runs the
program per chunk of rows on each thread, CUDA on the whole batch inside one CUDA
graph); which layer feeds which, where the head reads and the order of backward are
decided here alone.

:mod:`fastlstm.reference` is deliberately not built on this module: it is the
independent oracle this program is checked against.  If it ran the same program, a
mistake in the composition would be shared by every backend and every parity test.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

from .params import ParamLayout

__all__ = ["ModelSpec", "Ops", "forward", "backward"]


@dataclass(frozen=True)
class ModelSpec:
    """A stacked LSTM read over the time steps, and a linear head on its last hidden state.

    Exactly ``torch.nn.LSTM(batch_first=True, bidirectional=...)`` followed by
    ``torch.nn.Linear``, with PyTorch's parameter names and gate order (i, f, g, o).

    Parameters
    ----------
    input_size : int
        Inputs per time step of the first layer.
    hidden_size : int
        Hidden units of every layer and direction.
    num_layers : int
        Stacked layers; layer ``k + 1`` reads the hidden states of layer ``k``.
    output_size : int
        Outputs of the head (classes, or regression targets).
    bidirectional : bool, default=False
        Every layer also runs from each sequence's last valid step back to its
        first; the layer above reads ``[h_forward, h_reverse]`` at each step, and
        the head ``cat(h_n[-2], h_n[-1])``, the top layer's last state of each
        direction (PyTorch's ``h_n``).
    """

    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    bidirectional: bool = False

    def __post_init__(self):
        for name in ("input_size", "hidden_size", "num_layers", "output_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "bidirectional", bool(self.bidirectional))

    @functools.cached_property
    def layout(self) -> ParamLayout:
        """The flat parameter buffer of this network: names, shapes, offsets."""
        return ParamLayout(self.input_size, self.hidden_size, self.num_layers, self.output_size,
                           self.bidirectional)

    @property
    def num_directions(self):
        """2 for a bidirectional network, else 1."""
        return 2 if self.bidirectional else 1

    def layer_input_size(self, k):
        """Inputs per step of layer ``k``."""
        return self.input_size if k == 0 else self.num_directions * self.hidden_size

    @classmethod
    def from_state_dict(cls, state):
        """The spec whose parameters a ``{name: array}`` mapping with PyTorch's names holds.

        Only the sizes are read here; :meth:`ParamLayout.from_state_dict` checks
        every name and shape.
        """
        if "lstm.weight_ih_l0" not in state or "head.weight" not in state:
            raise ValueError("state_dict needs PyTorch's names 'lstm.weight_ih_l0', ..., "
                             f"'head.weight', 'head.bias'; got {sorted(state)}")
        return cls(input_size=state["lstm.weight_ih_l0"].shape[-1],
                   hidden_size=state["lstm.weight_hh_l0"].shape[-1] if "lstm.weight_hh_l0" in
                   state else state["head.weight"].shape[-1],
                   num_layers=sum(name.startswith("lstm.weight_ih_l")
                                  and not name.endswith("_reverse") for name in state),
                   output_size=state["head.weight"].shape[0],
                   bidirectional="lstm.weight_ih_l0_reverse" in state)


class Ops(Protocol):
    """The primitives a backend gives the network program, bound to one set of rows.

    ``Seq`` and ``Grad`` are the backend's own handles (buffers, layouts); the
    program only passes them from one primitive to the next.  ``lengths`` (one per
    row, or ``None``: every row has all steps) are given to :meth:`inputs`; every
    recurrence then reads each row up to its length only, as
    ``torch.nn.utils.rnn.pack_padded_sequence``.
    """

    def inputs(self, x, lengths) -> Any:
        """The handle of the network's input sequence ``x`` (these rows)."""

    def recurrence(self, k, seq, h0, c0, reverse) -> Any:
        """Layer ``k`` over ``seq`` from the initial states ``h0``, ``c0`` (arrays of the
        whole batch, or ``None`` for zeros), from each row's last valid step back to
        its first where ``reverse``; its output sequence."""

    def join(self, outs) -> Any:
        """The directions' output sequences side by side: the next layer's input."""

    def readout(self, outs) -> Any:
        """Each row's last hidden state of each direction in ``outs``, side by side."""

    def head(self, h) -> Any:
        """The head's outputs for hidden states ``h``."""

    def head_backward(self, doutputs) -> Any:
        """The gradient w.r.t. the hidden states the head read."""

    def readout_backward(self, dh) -> list:
        """The gradient w.r.t. each direction's output sequence of the top layer."""

    def recurrence_backward(self, k, dseq, reverse, input_grads) -> Any:
        """Backward through one direction of layer ``k`` from ``dseq``, its weight
        gradients included; its part of the gradient w.r.t. the layer's input where
        ``input_grads`` (else ``None``)."""

    def join_backward(self, dins, parts) -> list:
        """The gradient w.r.t. a layer's input, summed over its directions' parts
        ``dins``, cut into the ``parts`` sequences that were joined into it."""


def _initial(state, n):
    return None if state is None else state[n]


def forward(ops: Ops, spec: ModelSpec, x, h0=None, c0=None, lengths=None):
    """The network on ``x``: every layer and direction in turn, then the head.

    ``h0`` and ``c0`` have PyTorch's shape ``(num_layers * num_directions, batch,
    hidden)``, or are ``None`` for zeros; ``lengths`` gives each row's number of
    valid steps (``None``: all).  Returns the head's outputs, in the backend's memory.
    """
    seq = ops.inputs(x, lengths)
    D = spec.num_directions
    for k in range(spec.num_layers):
        outs = [ops.recurrence(k, seq, _initial(h0, k * D + d), _initial(c0, k * D + d),
                               reverse=d == 1) for d in range(D)]
        if k < spec.num_layers - 1:
            seq = outs[0] if D == 1 else ops.join(outs)
    return ops.head(ops.readout(outs))


def backward(ops: Ops, spec: ModelSpec, doutputs, input_grads=False):
    """Backpropagate ``doutputs`` through the head and every layer, top first.

    Weight gradients land where the backend's ops keep them.  Returns the gradient
    w.r.t. the input sequence where ``input_grads`` (else ``None``).
    """
    D = spec.num_directions
    dseqs = ops.readout_backward(ops.head_backward(doutputs))
    for k in reversed(range(spec.num_layers)):
        wanted = input_grads or k > 0
        dins = [ops.recurrence_backward(k, dseqs[d], reverse=d == 1, input_grads=wanted)
                for d in reversed(range(D))][::-1]
        if wanted:
            dseqs = dins if D == 1 else ops.join_backward(dins, D if k > 0 else 1)
    return dseqs[0] if input_grads else None
