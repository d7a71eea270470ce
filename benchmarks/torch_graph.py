"""The PyTorch baseline's training step on static input buffers, captured in a CUDA graph.

This follows PyTorch's whole-network capture recipe (the "CUDA Graphs" section of PyTorch's
CUDA semantics notes): a few warm-up steps on a side stream, ``zero_grad(set_to_none=True)``
so that the captured backward allocates the gradients from the graph's private memory pool,
the forward, loss, backward and ``optimizer.step()`` captured by ``torch.cuda.graph``, then
per batch a copy into the static tensors and ``graph.replay()``.  The optimizer must be
built with ``capturable=True``.

A graph has fixed shapes, so an epoch whose last batch is shorter gets a second captured
step for that size (each with its own pool; both update the same parameters and Adam state,
which the warm-up allocated outside any capture).  The warm-up steps train the model too:
three steps per batch size, before the benchmark's warm-up epoch.

Where CUDA graphs do not exist (a CPU tensor), the same step runs eagerly on the same static
buffers, so the copy-in, the short last batch and the loss sum are testable without a GPU;
:attr:`TorchStaticSteps.replays` then stays 0, and the benchmark labels no row "graph".
"""

from __future__ import annotations

#: untimed steps before a capture: PyTorch's recipe runs a few, so that lazy initialisation
#: (cuBLAS and cuDNN handles, Adam's state, autograd's streams) happens outside the graph
WARMUP_STEPS = 3


class _StaticStep:
    """Forward, softmax cross-entropy, backward and optimizer step of one batch size, reading
    its batch from the tensors :attr:`x` and :attr:`y`; captured where the tensors are on CUDA."""

    def __init__(self, net, optimizer, X, y, batch):
        self.net, self.optimizer = net, optimizer
        self.x = X.new_empty((batch, *X.shape[1:]))
        self.y = y.new_empty((batch,))
        self.x.copy_(X[:batch])  # real samples for the warm-up steps, as the recipe asks
        self.y.copy_(y[:batch])
        self.loss = None
        self.graph = None
        if X.is_cuda:
            self._capture()

    def _body(self):
        from torch.nn.functional import cross_entropy
        self.loss = cross_entropy(self.net(self.x), self.y)
        self.loss.backward()
        self.optimizer.step()

    def _capture(self):
        import torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self._body()
        self.graph = graph

    def run(self, X, y, idx):
        """Copy the batch ``X[idx]``, ``y[idx]`` into the static tensors and train on it;
        returns the loss tensor (the graph's static output: read it before the next step)."""
        import torch
        torch.index_select(X, 0, idx, out=self.x)
        torch.index_select(y, 0, idx, out=self.y)
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            self._body()
        else:
            self.graph.replay()
        return self.loss.detach()


class TorchStaticSteps:
    """The captured training steps of one network and optimizer, one per batch size met.

    Parameters
    ----------
    net : torch.nn.Module
        The model (:func:`_common.torch_model`), on the device of ``X``.
    optimizer : torch.optim.Optimizer
        Built with ``capturable=True`` where ``X`` is on CUDA.
    X, y : torch.Tensor
        All samples and labels; batches are taken from them by index.
    """

    def __init__(self, net, optimizer, X, y):
        self.net, self.optimizer, self.X, self.y = net, optimizer, X, y
        self._steps: dict[int, _StaticStep] = {}
        #: how many training steps ran as a graph replay
        self.replays = 0

    def train_epoch(self, order, batch):
        """:func:`_common.torch_train_epoch` with each step on static buffers, replayed from
        its graph where captured: returns the sum of the minibatch losses, left on the device
        (no synchronisation)."""
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            size = len(idx)
            if size not in self._steps:
                self._steps[size] = _StaticStep(self.net, self.optimizer, self.X, self.y, size)
            step = self._steps[size]
            total = total + step.run(self.X, self.y, idx)
            self.replays += step.graph is not None
        return total
