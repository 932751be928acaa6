"""Retrieval-augmented transfer sets (papers/001): which gallery items to add to a few labelled task images.

:func:`query_balanced` is the paper's selection rule; :func:`best_matches` and :func:`random_ids` its baselines
(kdforge.retrieval.selection). :func:`deduplicate` and :func:`find_leaks` clean a retrieved set
(kdforge.retrieval.dedup). The neighbour lists come from :func:`kdforge.ops.knn`.
"""

from kdforge.retrieval.dedup import Leaks, deduplicate, find_leaks
from kdforge.retrieval.selection import best_matches, query_balanced, random_ids

__all__ = ["Leaks", "best_matches", "deduplicate", "find_leaks", "query_balanced", "random_ids"]
