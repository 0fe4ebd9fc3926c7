"""The limits of a check (:class:`CheckThresholds`), apart from the check itself.

The check (:mod:`bncal.checking`) judges against them, and the recalibration report and its
pictures (:mod:`bncal.report`, :mod:`bncal.plot`) say whether old statistics were outside them;
kept here, below all three, so that none imports the others for them.
"""

from __future__ import annotations

import dataclasses

__all__ = ["CheckThresholds"]


@dataclasses.dataclass(frozen=True)
class CheckThresholds:
    """Limits for a check (:func:`bncal.check`); a model passes when every layer and output is within them.

    ``max_mean_shift`` (0.1): largest per-channel ``|moving mean - population mean| /
    sqrt(population var + eps)``: the BN output moves by that many of its own standard
    deviations (times ``|scale|``). Stale statistics are typically off by 0.3 to several units
    (the shipped stale MNIST CNN: 6).

    ``max_var_log_ratio`` (0.2): largest per-channel ``|log((moving var + eps) / (population
    var + eps))|``, i.e. the moving variance within -18 % / +22 % of the population one (the
    BN output's scale within about 10 %). The stale MNIST CNN: 2.9.

    ``noise_allowance`` (3.0): the population statistics are themselves estimated from the
    check's n values per channel, with standard errors ``1/sqrt(n)`` (mean shift, in sd) and
    ``sqrt(2/n)`` (log variance). Each layer's limits are widened by this many standard errors,
    so checking on held-out data does not fail layers that see few values: a BatchNorm1d
    recalibrated on 1024 MNIST digits and checked on 512 others measures a shift of 0.12 and
    a log variance ratio of 0.17 from sampling alone (limits there: 0.23 and 0.39); a conv
    layer with 25,000 values per channel gets 0.12 and 0.23.

    ``false_alarm`` (0.001) and ``moving_samples_ratio`` (1.0): a layer off those limits is
    called unresolved (not enough data to judge, :attr:`bncal.checking.LayerCheck.unresolved`) rather than
    failed when every channel is within the difference that sampling alone produces with
    probability ``1 - false_alarm`` per layer (:func:`bncal.checking.unresolved_allowance`): the standard
    errors the check's batches really show (:class:`bncal.checking.BatchSpread`), times the quantile that
    keeps the largest of the layer's ``2 * channels`` statistics within it (Bonferroni), times
    ``sqrt(1 + 1 / moving_samples_ratio)`` because the moving statistics were estimated from a
    sample too: ``moving_samples_ratio`` is how many times the check's samples they came from
    (1, the default, assumes as many; ``math.inf`` treats them as exact). At 0.001 per layer a
    50-layer model whose statistics are as good as its data allows is called FAILED in about
    5 % of checks at most.

    ``max_spread_ratio`` (1.5): per output, ``rms(inference - train) / rms(train - train')``
    where train' is train mode on the re-paired batches (:mod:`bncal.checking`): how much more
    inference mode departs from train mode than a second batching of the same samples does.
    Measured on the MNIST CNN (held-out digits, batches of 8 to 64): 0.89 to 1.03 once
    recalibrated (train or eval mode), 1.15 to 1.52 with statistics estimated from only 16
    digits, 2.6 to 7.5 stale. The limit is widened by ``sqrt(1 + n / M)`` for batches of ``n``
    and moving statistics from ``M = moving_samples_ratio`` times the check's samples
    (:meth:`bncal.checking.OutputAgreement.moving_error_factor`): 1.016 for batches of 32 in 1000 samples,
    1.22 for batches of 64 in 128 (``OutputCheck.spread_limit``). For ``(N, classes)`` outputs
    the arg-max must agree as well: the samples whose inference arg-max differs from train
    mode's may number at most that limit times those that differ between the two batchings,
    plus three Poisson standard errors (``3 * sqrt(that + 1)``): a randomly initialised network
    on random inputs has logits with tiny margins, and both counts are then large together.

    ``min_top1_agreement`` and ``max_output_rel_error`` (None): optional fixed limits on the
    fraction of samples whose arg-max agrees between inference and train mode, and on
    ``rms(inference - train) / rms(train)``, applied on top when given. Where no second
    batching exists (a single batch, or batches of one sample each) the output test falls
    back to fixed limits of 0.8 and 0.5 (:data:`bncal.checking.FALLBACK_OUTPUT_LIMITS`), except that batches
    of one sample each are not judged at all: train mode then normalises each sample by itself.

    The layer test is the precise one; the output tests catch what it cannot see (a BN bncal
    had to skip, a wrong graph) and need batches drawn at random from the data: batches that
    each hold one class have batch statistics far from the population, and train mode then
    disagrees with any inference model.
    """

    max_mean_shift: float = 0.1
    max_var_log_ratio: float = 0.2
    noise_allowance: float = 3.0
    min_top1_agreement: float | None = None
    max_output_rel_error: float | None = None
    max_spread_ratio: float = 1.5
    false_alarm: float = 0.001
    moving_samples_ratio: float = 1.0
