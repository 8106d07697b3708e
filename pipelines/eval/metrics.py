"""The evaluation metrics' names, as MLflow records them for every evaluated stage, and which way is better.

One owner: the evaluate job logs under these names, quality gates and the parent run's stage comparison read
them, a guidance sweep picks its best point by one of them.
"""

from __future__ import annotations

ADHERENCE_COLOR = "adherence_color"  # demo prompts: share of images whose detected colour is the prompt's
ADHERENCE_SHAPE = "adherence_shape"  # demo prompts: share of images whose detected shape is the prompt's
FID = "fid"  # Frechet Inception distance to a reference image set (Inception-v3 pool features)
CLIP_SCORE = "clip_score"  # 100 * mean cosine(CLIP image embedding, CLIP text embedding), floored at 0

EVAL_METRICS = (ADHERENCE_COLOR, ADHERENCE_SHAPE, FID, CLIP_SCORE)
LOWER_IS_BETTER = frozenset({FID})


def better(metric: str, a: float, b: float) -> bool:
    """Whether value `a` of `metric` is strictly better than `b`."""
    return a < b if metric in LOWER_IS_BETTER else a > b
