"""Offline scoring of whole tables and image stores on Ray Data (the `batch` extra): `oodserve score`, and
`score_dataset` (a Ray Dataset in, verdicts out) and `score_frame` (a pandas DataFrame or numpy array, no Ray)
for notebooks and pipelines. Verdicts are the server's: each actor builds the same torch-free Engine once and
scores numpy batches with it."""

from oodserve.batch.run import BadRowError, BatchOptions, ScoreSummary, score_dataset, score_file, score_frame
from oodserve.batch.scorer import BatchScorer, Payload
from oodserve.batch.sources import SourceError

__all__ = ["BadRowError", "BatchOptions", "BatchScorer", "Payload", "ScoreSummary", "SourceError", "score_dataset", "score_file",
           "score_frame"]
