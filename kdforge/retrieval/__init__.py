"""Retrieval-augmented transfer sets (papers/001): which gallery images or crops to add to a few labelled task
images.

- :func:`embed_store` embeds a gallery (image or crop level, one or more encoders) into resumable fp16 shards that
  :class:`GalleryStore` reads back (kdforge.retrieval.store; crops are remade from :mod:`kdforge.retrieval.crops`).
- :func:`search` finds each query's nearest entries over the shards, exactly (kdforge.ops.knn, streamed) or with a
  faiss index (kdforge.retrieval.nearest).
- :func:`query_balanced` is the paper's selection rule; :func:`best_matches` and :func:`random_ids` its baselines
  (kdforge.retrieval.selection). :func:`deduplicate` and :func:`find_leaks` clean a retrieved set
  (kdforge.retrieval.dedup).
- :func:`run_retrieval` is ``kdforge retrieve``: all of the above from a recipe's [retrieve] table to a manifest
  that the ``retrieved`` data source reads (kdforge.retrieval.pipeline).
"""

from kdforge.retrieval.dedup import Leaks, deduplicate, duplicate_clusters, find_leaks
from kdforge.retrieval.nearest import search
from kdforge.retrieval.pipeline import RetrieveConfig, run_retrieval
from kdforge.retrieval.selection import best_matches, query_balanced, random_ids
from kdforge.retrieval.store import GallerySpec, GalleryStore, embed_store

__all__ = [
    "GallerySpec",
    "GalleryStore",
    "Leaks",
    "RetrieveConfig",
    "best_matches",
    "deduplicate",
    "duplicate_clusters",
    "embed_store",
    "find_leaks",
    "query_balanced",
    "random_ids",
    "run_retrieval",
    "search",
]
