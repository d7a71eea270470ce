"""Our state dict is PyTorch's: the same weights give the same probabilities in both directions."""

import numpy as np
import pytest

from fastlstm import LSTMClassifier, LSTMRegressor

torch = pytest.importorskip("torch", reason="PyTorch is needed to compare with nn.LSTM "
                                            "(pip install torch)")


class TorchLSTM(torch.nn.Module):
    """``nn.LSTM(batch_first=True)`` and ``nn.Linear`` on the last step's top hidden state."""

    def __init__(self, input_size, hidden_size, num_layers, outputs):
        super().__init__()
        self.lstm = torch.nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.head = torch.nn.Linear(hidden_size, outputs)

    def forward(self, x):
        sequence, _ = self.lstm(x)
        return self.head(sequence[:, -1])


def sequences(n=40, steps=6, inputs=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, steps, inputs)).astype(np.float32)
    return X, np.digitize(X[:, :, 0].sum(axis=1), [-1.0, 1.0])


def torch_outputs(model, X):
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


@pytest.mark.parametrize("num_layers", [1, 2])
def test_our_weights_in_torch_give_our_probabilities(num_layers):
    X, y = sequences()
    clf = LSTMClassifier(hidden_size=5, num_layers=num_layers, max_iter=2, batch_size=16,
                         learning_rate_init=0.05, random_state=0, device="cpu").fit(X, y)
    model = TorchLSTM(3, 5, num_layers, 3)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in clf.state_dict().items()})
    expected = torch.softmax(torch.from_numpy(torch_outputs(model, X)), dim=1).numpy()
    np.testing.assert_allclose(clf.predict_proba(X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_predictions_with_dropout_equal_torch_eval_mode(bidirectional):
    """Dropout is for training: fitted with it, the model predicts as ``nn.LSTM(dropout=p)``
    in ``eval()`` mode with the same weights."""
    X, y = sequences()
    clf = LSTMClassifier(hidden_size=5, num_layers=2, bidirectional=bidirectional, dropout=0.3,
                         recurrent_dropout=0.3, max_iter=2, batch_size=16,
                         learning_rate_init=0.05, random_state=0, device="cpu").fit(X, y)
    lstm = torch.nn.LSTM(3, 5, 2, batch_first=True, dropout=0.3, bidirectional=bidirectional)
    head = torch.nn.Linear(10 if bidirectional else 5, 3)
    model = torch.nn.ModuleDict(dict(lstm=lstm, head=head))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in clf.state_dict().items()})
    model.eval()
    with torch.no_grad():
        _, (h_n, _) = lstm(torch.from_numpy(X))
        last = torch.cat([h_n[-2], h_n[-1]], dim=1) if bidirectional else h_n[-1]
        expected = torch.softmax(head(last), dim=1).numpy()
    np.testing.assert_allclose(clf.predict_proba(X), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(clf.predict_proba(X), clf.predict_proba(X))


def test_a_model_trained_in_torch_predicts_the_same_here():
    X, y = sequences()
    torch.manual_seed(0)
    model = TorchLSTM(3, 6, 2, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
    clf = LSTMClassifier(hidden_size=6, num_layers=2, device="cpu").load_state_dict(
        model.state_dict())
    logits = torch_outputs(model, X)
    np.testing.assert_allclose(clf.predict_proba(X),
                               torch.softmax(torch.from_numpy(logits), dim=1).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(clf.predict(X), logits.argmax(axis=1))


def test_regressor_outputs_equal_torch_outputs():
    X, y = sequences()
    reg = LSTMRegressor(hidden_size=4, max_iter=2, batch_size=16, random_state=0,
                        device="cpu").fit(X, np.column_stack([y, -y]))
    model = TorchLSTM(3, 4, 1, 2)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in reg.state_dict().items()})
    np.testing.assert_allclose(reg.predict(X), torch_outputs(model, X), rtol=1e-5, atol=1e-6)


class TorchPacked(torch.nn.Module):
    """``nn.LSTM`` on ``pack_padded_sequence`` and ``nn.Linear`` on PyTorch's ``h_n`` of the
    top layer (both directions' where bidirectional): what ``ModelSpec`` describes."""

    def __init__(self, input_size, hidden_size, num_layers, outputs, bidirectional):
        super().__init__()
        self.lstm = torch.nn.LSTM(input_size, hidden_size, num_layers, batch_first=True,
                                  bidirectional=bidirectional)
        self.head = torch.nn.Linear(hidden_size * (2 if bidirectional else 1), outputs)

    def forward(self, x, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.as_tensor(lengths),
                                                         batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        last = torch.cat([h_n[-2], h_n[-1]], dim=1) if self.lstm.bidirectional else h_n[-1]
        return self.head(last)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_backend_equals_torch_on_packed_sequences(backend, num_layers, bidirectional):
    """Outputs and every gradient, float64, against PyTorch's packed LSTM on the same weights."""
    from fastlstm.model import ModelSpec

    rng = np.random.default_rng(3)
    B, T, I, H, O = 11, 7, 3, 4, 3
    spec = ModelSpec(I, H, num_layers, O, bidirectional)
    params = spec.layout.init(rng, np.float64) * 2
    x = rng.standard_normal((B, T, I))
    y = rng.integers(0, O, B)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    model = TorchPacked(I, H, num_layers, O, bidirectional).double()
    model.load_state_dict({k: torch.from_numpy(v.copy())
                           for k, v in spec.layout.views(params).items()})
    logits = model(torch.from_numpy(x), lengths)
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()

    p = backend.asarray(params)
    outputs, cache = backend.forward(spec, p, backend.asarray(x), train=True, lengths=lengths)
    _, doutputs = backend.loss(outputs, backend.asarray(y), "cross_entropy")
    grads = spec.layout.views(backend.to_host(backend.backward(spec, p, cache, doutputs).params))
    np.testing.assert_allclose(backend.to_host(outputs), logits.detach().numpy(), rtol=1e-10,
                               atol=1e-12)
    for name, param in model.named_parameters():
        np.testing.assert_allclose(grads[name], param.grad.numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_ragged_fit_in_torch_packed_gives_our_probabilities(num_layers, bidirectional):
    """A classifier fitted on a list of sequences: its state_dict in PyTorch's packed LSTM
    gives its predict_proba."""
    X, y = sequences(n=60, steps=9)
    lengths = np.random.default_rng(1).integers(1, 10, len(X))
    seqs = [x[:n] for x, n in zip(X, lengths)]
    clf = LSTMClassifier(hidden_size=5, num_layers=num_layers, bidirectional=bidirectional,
                         max_iter=2, batch_size=16, learning_rate_init=0.05, random_state=0,
                         device="cpu").fit(seqs, y)
    model = TorchPacked(3, 5, num_layers, 3, bidirectional)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in clf.state_dict().items()})
    padded = np.zeros_like(X)
    for row, seq in enumerate(seqs):
        padded[row, :len(seq)] = seq
    with torch.no_grad():
        logits = model(torch.from_numpy(padded), lengths)
    np.testing.assert_allclose(clf.predict_proba(seqs), torch.softmax(logits, dim=1).numpy(),
                               rtol=1e-5, atol=1e-6)
