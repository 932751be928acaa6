"""Retrieval-augmented transfer sets (papers/001): which gallery items to add to a few labelled task images.

:func:`query_balanced` is the paper's selection rule; :func:`best_matches` and :func:`random_ids` its baselines
(kdforge.retrieval.selection). :func:`deduplicate` and :func:`find_leaks` clean a retrieved set
(kdforge.retrieval.dedup). :func:`embed_gallery` writes a gallery's embeddings to a resumable .npy memmap
(kdforge.retrieval.gallery), which :func:`kdforge.ops.knn` streams to the device to find the neighbour lists;
:func:`search` finds them over a gallery stored as several such shards, exactly or with a faiss index
(kdforge.retrieval.search).
"""

from kdforge.retrieval.dedup import Leaks, deduplicate, find_leaks
from kdforge.retrieval.gallery import embed_gallery
from kdforge.retrieval.search import search
from kdforge.retrieval.selection import best_matches, query_balanced, random_ids

__all__ = [
    "Leaks",
    "best_matches",
    "deduplicate",
    "embed_gallery",
    "find_leaks",
    "query_balanced",
    "random_ids",
    "search",
]
