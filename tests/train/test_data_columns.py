import numpy as np
from datasets import Dataset

from hf_gaf.train.data.columns import column_as_numpy


def test_reads_the_column_in_row_order_after_select_and_shuffle():
    dataset = Dataset.from_dict({"label": list(range(10)), "other": ["x"] * 10})
    reordered = dataset.shuffle(seed=0).select([4, 2, 7])

    values = column_as_numpy(reordered, "label")

    assert isinstance(values, np.ndarray)
    assert values.tolist() == [reordered[i]["label"] for i in range(3)]


def test_ignores_a_transform_that_drops_the_column():
    dataset = Dataset.from_dict({"label": [3, 1, 2]}).with_transform(lambda batch: {"pixel_values": batch["label"]})

    assert column_as_numpy(dataset, "label").tolist() == [3, 1, 2]
