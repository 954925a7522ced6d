"""Accuracy as an `evaluate` metric that ships with hf-gaf, so it loads without the Hub.

Same inputs and output as the Hub's `accuracy` metric for single-label classification.
Load it with `hf_gaf.train.metrics.load_metric("accuracy")` (or `evaluate.load` on this file's folder).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the fraction of predictions equal to their reference label:
accuracy = (number of correct predictions) / (number of predictions).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): ground-truth class ids, one per prediction.
    normalize (`bool`, defaults to `True`): if `False`, return the number of correct predictions.
    sample_weight (`list` of `float`, *optional*): one weight per prediction.
Returns:
    accuracy (`float` or `int`): in [0, 1] (or a count when `normalize=False`).
Examples:
    >>> accuracy = hf_gaf.train.metrics.load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/accuracy"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("accuracy needs at least one prediction; the evaluation set is empty.")
        weights = np.ones(predictions.shape, dtype=np.float64) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != predictions.shape:
            raise ValueError(f"sample_weight has {weights.size} values for {predictions.size} predictions; pass one weight per prediction.")
        correct = float(np.sum(weights * (predictions == references)))
        if not normalize:
            return {"accuracy": int(correct) if sample_weight is None else correct}
        return {"accuracy": correct / float(np.sum(weights))}
