"""Saving and loading fitted detectors without pickle.

A saved detector is a directory: ``detector.json`` (class, parameters, threshold
strategy, learned scalars and small arrays) and the fitted estimator, in the skops
format for scikit-learn (``estimator.skops``) or as safetensors for torch
(``weights.safetensors``). Loading trusts only the skops types the family names, so a
tampered artifact cannot widen them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from models.base import BaseDetector, score_floor
from models.registry import strategy_from_dict, strategy_to_dict

__all__ = ["load_skops", "read_metadata", "save_skops", "write_metadata"]

D = TypeVar("D", bound=BaseDetector)
METADATA = "detector.json"
SKOPS_FILE = "estimator.skops"


def write_metadata(
    detector: BaseDetector,
    directory: Path,
    state: Iterable[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the detector's class, parameters, threshold and the named learned attributes."""
    directory.mkdir(parents=True, exist_ok=True)
    params = detector.get_params(deep=False)
    params["threshold_strategy"] = strategy_to_dict(params.get("threshold_strategy"))
    learned: dict[str, Any] = {}
    kept = ("threshold_", "n_features_in_", *state)
    # The median training row, when the family has one (row families: `BaseDetector.fit`).
    kept += ("reference_",) if hasattr(detector, "reference_") else ()
    for name in kept:
        value = getattr(detector, name)
        learned[name] = value.tolist() if isinstance(value, np.ndarray) else value
    learned["score_floor_"] = score_floor(detector)
    data = {
        "class": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "params": params,
        "learned": learned,
        **(extra or {}),
    }
    (directory / METADATA).write_text(json.dumps(data, indent=2, allow_nan=False))


def read_metadata(directory: Path, cls: type[D]) -> tuple[D, dict[str, Any]]:
    """An unfitted ``cls`` with the stored parameters, and the stored metadata."""
    data = json.loads((directory / METADATA).read_text())
    expected = f"{cls.__module__}.{cls.__qualname__}"
    if data.get("class") != expected:
        raise ValueError(f"{directory} holds a {data.get('class')}, not a {expected}")
    params = dict(data["params"])
    params["threshold_strategy"] = strategy_from_dict(params.get("threshold_strategy"))
    detector = cls(**params)
    for name, value in data["learned"].items():
        setattr(detector, name, np.asarray(value) if isinstance(value, list) else value)
    return detector, data


def save_skops(detector: BaseDetector, directory: Path, state: Iterable[str] = ()) -> None:
    """Save a detector whose fitted scikit-learn object is ``estimator_``."""
    import skops.io

    write_metadata(detector, directory, state)
    skops.io.dump(detector.estimator_, directory / SKOPS_FILE)  # type: ignore[attr-defined]


def load_skops(directory: Path, cls: type[D], trusted: Iterable[str] = ()) -> D:
    """Load what `save_skops` wrote, refusing any type outside skops' defaults and ``trusted``."""
    import skops.io

    detector, _ = read_metadata(directory, cls)
    path = directory / SKOPS_FILE
    untrusted = set(skops.io.get_untrusted_types(file=path))
    unexpected = untrusted - set(trusted)
    if unexpected:
        raise ValueError(
            f"{path} holds types qabuse does not trust: {sorted(unexpected)}; refusing to load it"
        )
    detector.estimator_ = skops.io.load(path, trusted=sorted(untrusted))  # type: ignore[attr-defined]
    return detector
