"""The test metrics TerraTorch logs, by the names of each of its versions (1.1 renamed them)."""

from __future__ import annotations

#: Mean intersection over union of a segmentation task: TerraTorch >= 1.1, then 1.0.
MIOU = ("test/mIoU", "test/Multiclass_Jaccard_Index")
#: Overall accuracy of a classification task: TerraTorch >= 1.1, then 1.0.
ACCURACY = ("test/Accuracy", "test/Overall_Accuracy")


def metric(metrics: dict, *names: str) -> float:
    """The value of the first of ``names`` among ``metrics`` (a test's logged metrics)."""
    for name in names:
        if name in metrics:
            return metrics[name]
    raise AssertionError(f"none of {names} in {sorted(metrics)}")
