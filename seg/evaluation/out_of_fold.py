"""A stage's cross-validation estimate: each fold's model scored on its own held-out fold,
pooled into one score and spread over the folds. The reduction writes it into its report,
the experiment's report and the comparison show it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from seg.core import runs
from seg.results.records import read_stage

OOF_SOURCES = {
    "final": "each fold's final model on its own held-out fold",
    "best": "each fold's best checkpoint on its own held-out fold (chosen on that fold: leans optimistic)",
}


def out_of_fold(results: dict[int, dict[str, Any] | None], source: str = "final") -> dict[str, Any]:
    """The cross-validation estimate of a stage two ways, from each fold's evaluation on its
    own held-out fold (``results``: fold -> that result, None when there is none):

    - ``pooled``: every held-out image predicted once by the fold model that did not train on
      it, scored as one set: the folds' confusion matrices summed, then mIoU, per-class IoU,
      fwIoU (seg.evaluation.metrics.pooled). Exact whatever the processes of each evaluation (each
      matrix is already the sum over its ranks); ``None`` when a fold's result carries no
      matrix (trained before results recorded it): ``missing`` names those folds.
    - ``mean``/``std``/``min``/``max`` of the per-fold mIoU and fwIoU (``per_fold``): each fold
      weighs the same, however many images and pixels it holds, so with unbalanced folds or
      rare classes the mean differs from the pooled score.
    """
    from seg.evaluation.metrics import pooled  # (torch: only when a stage is scored, not for every report)

    folds = sorted(results)
    scored = {k: r for k, r in results.items() if isinstance(r, dict) and isinstance(r.get("miou"), int | float)}
    per_fold = {m: {str(k): float(r.get(m, math.nan)) for k, r in sorted(scored.items())} for m in ("miou", "fwiou")}
    record: dict[str, Any] = {"source": source, "describes": OOF_SOURCES.get(source, source), "folds": folds,
                              "per_fold": per_fold}  # fmt: skip
    for name, reduce in (("mean", np.mean), ("min", np.min), ("max", np.max)):
        record[name] = {m: float(reduce(list(v.values()))) if v else math.nan for m, v in per_fold.items()}
    record["std"] = {
        m: float(np.std(list(v.values()), ddof=1)) if len(v) > 1 else math.nan for m, v in per_fold.items()
    }
    missing = [k for k in folds if not isinstance((results[k] or {}).get("confusion"), list)]
    samples = [r.get("samples") for r in scored.values()]
    record["samples"] = sum(samples) if samples and all(isinstance(n, int) for n in samples) else None
    record["missing"] = missing
    if missing or not folds:
        record["pooled"] = None
        record["unavailable"] = (
            f"fold {', '.join(map(str, missing))} {'has' if len(missing) == 1 else 'have'} no confusion matrix in "
            f"{'its' if len(missing) == 1 else 'their'} final result (trained before summaries recorded it, or "
            "unfinished)"
            if missing
            else "no fold result"
        )
    else:
        record["pooled"] = pooled([results[k]["confusion"] for k in folds])
        record["unavailable"] = None
    return record


def stage_out_of_fold(stage_dir: Path, folds: list[int]) -> dict[str, Any]:
    """:func:`out_of_fold` of the folds' final evaluations (``summary.json``'s ``final.fold``)."""
    return out_of_fold(read_stage(runs.Stage.at(stage_dir)).final_fold_results(folds))
