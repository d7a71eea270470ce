"""The oracle, :mod:`fastlstm.reference`, behind the backend interface.

Every backend (the NumPy ``"reference"`` backend too) runs the network program of
:mod:`fastlstm.model`; the tests compare each with this adapter of the textbook
equations, which shares no composition with them.
"""

import numpy as np

from fastlstm import reference
from fastlstm.backends.base import Gradients
from fastlstm.backends.reference import ReferenceBackend


class Oracle(ReferenceBackend):
    """:mod:`fastlstm.reference` with the methods of :class:`~fastlstm.backends.base.Backend`.

    The loss, softmax and Adam of the NumPy backend are :mod:`fastlstm.reference`'s own
    already; only the network (forward, backward) is the oracle's here.
    """

    name = "oracle"

    def __init__(self, precision="float32"):
        #: the precision of the LSTM's GEMMs, as :func:`fastlstm.reference.forward` takes it
        self.precision = precision

    def forward(self, spec, params, x, h0=None, c0=None, train=False, lengths=None,
                dropout=None):
        masks = {}
        if dropout and train:  # the masks of fastlstm.dropout, rows numbered as in ``x``
            rows = np.arange(x.shape[0])
            masks = dict(between_masks=dropout.between_masks(spec, rows, x.shape[1], params.dtype),
                         recurrent_masks=dropout.recurrent_masks(spec, rows, params.dtype))
        outputs, cache = reference.forward(spec.layout.views(params), x, h0, c0, lengths, **masks,
                                           precision=self.precision)
        return outputs, (cache if train else None)

    def backward(self, spec, params, cache, doutputs, input_grads=False):
        grads, dx, dh0, dc0 = reference.backward(spec.layout.views(params), cache, doutputs)
        flat = np.empty_like(params)
        views = spec.layout.views(flat)
        for name, value in grads.items():
            views[name][...] = value
        return Gradients(flat, dx, dh0, dc0) if input_grads else Gradients(flat)


ORACLE = Oracle()
#: the oracle in the bfloat16 mode of :mod:`fastlstm.precision`
BF16_ORACLE = Oracle("bfloat16")
