"""The learning rate over the epochs of a fit, and when the fit stops for lack of progress.

One object, in the style of scikit-learn's ``_stochastic_optimizers``: the
epoch loop asks it for the current :attr:`LearningRateSchedule.rate` and
tells it at the end of each epoch whether the epoch improved; it answers
whether to stop.  Its whole state is the rate and the count of epochs since
the last improvement, so a fit saved at the end of an epoch continues from
exactly there.
"""

from __future__ import annotations

__all__ = ["LearningRateSchedule"]


class LearningRateSchedule:
    """``"constant"`` or ``"adaptive"`` learning rate, as :class:`~sklearn.neural_network.MLPClassifier`
    defines them, and the ``n_iter_no_change`` stopping rule.

    - ``"constant"``: the rate is ``learning_rate_init`` throughout.
    - ``"adaptive"``: each time two consecutive epochs fail to improve, the
      rate is divided by 5; when it is already at most :attr:`MIN_RATE`,
      training stops instead (MLP's rule).

    Either way training stops once more than ``n_iter_no_change`` epochs in
    a row have failed to improve: the count runs from the last improvement,
    across changes of the rate, so an adaptive fit never waits longer for an
    improvement than a constant one.

    Parameters
    ----------
    kind : {"constant", "adaptive"}
    learning_rate_init : float
        The rate of a new schedule, and of a ``"constant"`` one always (so a
        changed ``learning_rate_init`` applies at once).
    n_iter_no_change : int
        Epochs without improvement after which :meth:`end_epoch` says stop.
    rate : float, default=None
        The current rate of an ``"adaptive"`` schedule that continues
        (``None``: ``learning_rate_init``).
    no_improvement_count : int, default=0
        Epochs without improvement so far, of a schedule that continues.
    """

    #: an adaptive schedule stops rather than go below this rate (MLP's threshold)
    MIN_RATE = 1e-6
    #: an adaptive schedule divides its rate by this
    FACTOR = 5.0
    #: after this many epochs in a row without improvement
    PATIENCE = 2

    def __init__(self, kind, learning_rate_init, n_iter_no_change, rate=None,
                 no_improvement_count=0):
        self.kind = kind
        self.rate = learning_rate_init if kind == "constant" or rate is None else rate
        self.n_iter_no_change = n_iter_no_change
        self.no_improvement_count = no_improvement_count

    def end_epoch(self, improved):
        """Count the epoch that ended, adapt the rate, and say whether to stop.

        Parameters
        ----------
        improved : bool
            The epoch improved on the best one by more than ``tol``.

        Returns
        -------
        reason : str or None
            ``None`` to go on; else why training should stop, to follow
            "no improvement of more than tol=... " in a message.
        """
        if improved:
            self.no_improvement_count = 0
            return None
        self.no_improvement_count += 1
        if self.no_improvement_count > self.n_iter_no_change:
            return f"for {self.n_iter_no_change} epochs"
        if self.kind == "adaptive" and self.no_improvement_count % self.PATIENCE == 0:
            if self.rate <= self.MIN_RATE:
                return (f"for {self.PATIENCE} epochs at learning rate {self.rate:.3g} "
                        f"(at most {self.MIN_RATE:g})")
            self.rate /= self.FACTOR
        return None
