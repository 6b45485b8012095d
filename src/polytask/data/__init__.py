"""Multi-task datasets, the batch convention and built-in data sets."""

from polytask.data import recsys  # noqa: F401  (registers census_income, aliexpress, ali_ccp)
from polytask.data import sequences  # noqa: F401  (registers sequence_tasks, token_file)
from polytask.data.builtin import DATASETS, digits, load, split_indices, synthetic, task_weight_vectors
from polytask.data.dataset import Batch, MultiTaskDataset, Splits

__all__ = [
    "DATASETS",
    "Batch",
    "MultiTaskDataset",
    "Splits",
    "digits",
    "load",
    "split_indices",
    "synthetic",
    "task_weight_vectors",
]
