"""Label-noise memorisation as an `evaluate` metric that ships with hf-gaf (no Hub needed).

On a training set with corrupted labels, a network that fits the noise predicts the corrupted
label on those rows; one that resists it keeps predicting the true class. Load it with
`hf_gaf.train.metrics.load_metric("memorization")` (or `evaluate.load` on this file's folder).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Memorisation of noisy labels. A row is corrupted when its training label (`references`) differs
from its true label (`clean_references`). Over the corrupted rows, every prediction falls in
exactly one bucket:
- memorized: predicted the corrupted training label (the noise was fitted),
- correct:   predicted the true label (the noise was resisted),
- other:     predicted neither;
the three fractions sum to 1. On the uncorrupted rows, `uncorrupted_accuracy` is the usual
accuracy. With no corrupted row the three fractions are NaN (undefined) and `num_corrupted` is 0,
so a 0% noise run still logs the same keys.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids on training rows.
    references (`list` of `int`): the labels the model was trained on (possibly corrupted).
    clean_references (`list` of `int`): the true labels of the same rows.
Returns:
    memorized (`float`): fraction of corrupted rows predicted as their corrupted label.
    correct (`float`): fraction of corrupted rows predicted as their true label.
    other (`float`): fraction of corrupted rows predicted as neither.
    uncorrupted_accuracy (`float`): accuracy on the rows whose label was not corrupted.
    noise_rate (`float`): fraction of rows that are corrupted.
    num_corrupted (`int`): number of corrupted rows.
Examples:
    >>> memorization = hf_gaf.train.metrics.load_metric("memorization")
    >>> memorization.compute(
    ...     predictions=[3, 2, 7, 3, 0], references=[3, 1, 4, 3, 0], clean_references=[1, 2, 6, 5, 0]
    ... )
    {'memorized': 0.5, 'correct': 0.25, 'other': 0.25, 'uncorrupted_accuracy': 1.0, 'noise_rate': 0.8, 'num_corrupted': 4}
"""

_CITATION = """
@article{chaubard2024gaf,
  title={Beyond Gradient Averaging in Parallel Optimization: Improved Robustness through Gradient Agreement Filtering},
  author={Chaubard, Francois and Kochenderfer, Mykel},
  journal={arXiv preprint arXiv:2412.18052},
  year={2024}
}
"""


def _fraction(count, total):
    return float(count) / total if total else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Memorization(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "clean_references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, clean_references):
        predictions = np.asarray(predictions, dtype=np.int64)
        noisy = np.asarray(references, dtype=np.int64)
        clean = np.asarray(clean_references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("memorization needs at least one prediction; the evaluation set is empty.")
        corrupted = noisy != clean
        num_corrupted = int(corrupted.sum())
        num_uncorrupted = predictions.size - num_corrupted
        memorized = int(np.sum(corrupted & (predictions == noisy)))
        correct = int(np.sum(corrupted & (predictions == clean)))
        return {
            "memorized": _fraction(memorized, num_corrupted),
            "correct": _fraction(correct, num_corrupted),
            "other": _fraction(num_corrupted - memorized - correct, num_corrupted),
            "uncorrupted_accuracy": _fraction(np.sum(~corrupted & (predictions == clean)), num_uncorrupted),
            "noise_rate": num_corrupted / predictions.size,
            "num_corrupted": num_corrupted,
        }
