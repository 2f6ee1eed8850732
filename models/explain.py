"""SHAP attributions for the places a person reads them (an alert), not the scoring path.

A family's own ``explain`` is cheap enough for every ``/score`` answer. An alert is
rarer and read by an analyst, so it gets SHAP where the family allows: the Isolation
Forests (api key and user level) explain with ``shap.TreeExplainer`` (exact Tree SHAP
here, where ``/score`` uses the fast path-attribution mode) plus their beyond-range term,
and the kernel and neighbour families (LOF, One-Class SVM) with ``shap.KernelExplainer``
against the training population's median row (`reference_row`). The other families
(sequence, campaign, timing) keep their own attribution.

Example:
    >>> from models.lof import LocalOutlierFactorDetector
    >>> rng = np.random.default_rng(0)
    >>> det = LocalOutlierFactorDetector(n_neighbors=10).fit(rng.normal(5, 1, (300, 3)))
    >>> name, values = attribute(det, np.array([[5.0, 30.0, 5.0]]))
    >>> name, int(np.argmax(values[0]))
    ('shap.KernelExplainer', 1)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from sklearn.pipeline import Pipeline

from models.base import BaseDetector

__all__ = ["attribute", "reference_row"]

#: Coalitions KernelExplainer evaluates per row: exact up to 9 features, sampled above.
KERNEL_SAMPLES = 512


def reference_row(detector: BaseDetector) -> NDArray[np.float64] | None:
    """The training population's median row (``reference_``, which ``fit`` keeps).

    For a detector saved before it kept one: the families that scale signed-log inputs
    centre their ``RobustScaler`` on the median of ``signed_log(X)``, and the signed log
    is monotonic, so its inverse is the median of ``X``. None otherwise.
    """
    kept = getattr(detector, "reference_", None)
    if kept is not None:
        return np.asarray(kept, dtype=np.float64)
    estimator = getattr(detector, "estimator_", None)
    if not isinstance(estimator, Pipeline) or "scale" not in estimator.named_steps:
        return None
    center = getattr(estimator.named_steps["scale"], "center_", None)
    if center is None:
        return None
    center = np.asarray(center, dtype=np.float64)
    return np.asarray(np.sign(center) * np.expm1(np.abs(center)), dtype=np.float64)


def attribute(detector: BaseDetector, X: NDArray[np.float64]) -> tuple[str, NDArray[np.float64]]:
    """Per-feature contributions to each row's score, and the name of what computed them.

    Returns:
        ``(explainer, contributions)`` with contributions rows x features; larger pushed
        the row towards anomalous.
    """
    from models.isolation_forest import IsolationForestDetector

    X = np.asarray(X, dtype=np.float64)
    if isinstance(detector, IsolationForestDetector):
        return "shap.TreeExplainer", detector.tree_shap(X)
    reference = reference_row(detector) if X.ndim == 2 else None
    if reference is None or reference.shape[0] != X.shape[-1]:
        return f"{type(detector).__name__}.explain", detector.explain(X)
    import shap

    def score(rows: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(detector.decision_function(rows), dtype=np.float64)

    explainer = shap.KernelExplainer(score, reference[None, :])
    values = explainer.shap_values(X, nsamples=KERNEL_SAMPLES, silent=True)
    return "shap.KernelExplainer", np.asarray(values, dtype=np.float64).reshape(X.shape)
