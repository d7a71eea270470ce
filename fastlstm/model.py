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

    Exactly ``torch.nn.LSTM(batch_first=True)`` followed by ``torch.nn.Linear``,
    with PyTorch's parameter names and gate order (i, f, g, o).

    Parameters
    ----------
    input_size : int
        Inputs per time step of the first layer.
    hidden_size : int
        Hidden units of every layer.
    num_layers : int
        Stacked layers; layer ``k + 1`` reads the hidden states of layer ``k``.
    output_size : int
        Outputs of the head (classes, or regression targets).
    """

    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int

    def __post_init__(self):
        for name in ("input_size", "hidden_size", "num_layers", "output_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))

    @functools.cached_property
    def layout(self) -> ParamLayout:
        """The flat parameter buffer of this network: names, shapes, offsets."""
        return ParamLayout(self.input_size, self.hidden_size, self.num_layers, self.output_size)

    def layer_input_size(self, k):
        """Inputs per step of layer ``k``."""
        return self.input_size if k == 0 else self.hidden_size

    @classmethod
    def from_state_dict(cls, state):
        """The spec whose parameters a ``{name: array}`` mapping with PyTorch's names holds.

        Only the sizes are read here; :meth:`ParamLayout.from_state_dict` checks
        every name and shape.
        """
        if "lstm.weight_ih_l0" not in state or "head.weight" not in state:
            raise ValueError("state_dict needs PyTorch's names 'lstm.weight_ih_l0', ..., "
                             f"'head.weight', 'head.bias'; got {sorted(state)}")
        head = state["head.weight"].shape
        return cls(input_size=state["lstm.weight_ih_l0"].shape[-1], hidden_size=head[-1],
                   num_layers=sum(name.startswith("lstm.weight_ih_l") for name in state),
                   output_size=head[0])


class Ops(Protocol):
    """The primitives a backend gives the network program, bound to one set of rows.

    ``Seq`` and ``Grad`` are the backend's own handles (buffers, layouts); the
    program only passes them from one primitive to the next.
    """

    def inputs(self, x) -> Any:
        """The handle of the network's input sequence ``x`` (these rows)."""

    def recurrence(self, k, seq, h0, c0) -> Any:
        """Layer ``k`` over all steps of ``seq`` from the initial states ``h0``, ``c0``
        (arrays of the whole batch, or ``None`` for zeros); its output sequence."""

    def readout(self, seq) -> Any:
        """Each row's hidden state after its last step."""

    def head(self, h) -> Any:
        """The head's outputs for hidden states ``h``."""

    def head_backward(self, doutputs) -> Any:
        """The gradient w.r.t. the hidden states the head read."""

    def readout_backward(self, dh) -> Any:
        """The gradient w.r.t. the top layer's output sequence, from ``dh``."""

    def recurrence_backward(self, k, dseq, input_grads) -> Any:
        """Backward through layer ``k`` from ``dseq``, its weight gradients included;
        the gradient w.r.t. its input sequence where ``input_grads`` (else ``None``)."""


def forward(ops: Ops, spec: ModelSpec, x, h0=None, c0=None):
    """The network on ``x``: every layer in turn, then the head on the last hidden state.

    ``h0`` and ``c0`` have PyTorch's shape ``(num_layers, batch, hidden)``, or are
    ``None`` for zeros.  Returns the head's outputs, in the backend's memory.
    """
    seq = ops.inputs(x)
    for k in range(spec.num_layers):
        seq = ops.recurrence(k, seq, None if h0 is None else h0[k],
                             None if c0 is None else c0[k])
    return ops.head(ops.readout(seq))


def backward(ops: Ops, spec: ModelSpec, doutputs, input_grads=False):
    """Backpropagate ``doutputs`` through the head and every layer, top first.

    Weight gradients land where the backend's ops keep them.  Returns the gradient
    w.r.t. the input sequence where ``input_grads`` (else ``None``).
    """
    dseq = ops.readout_backward(ops.head_backward(doutputs))
    for k in reversed(range(spec.num_layers)):
        dseq = ops.recurrence_backward(k, dseq, input_grads=input_grads or k > 0)
    return dseq
