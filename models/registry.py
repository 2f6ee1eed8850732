"""The registry of detector families: what each family reads, its knobs, how it is stored.

A family is the unit of detection. Adding one means one module in ``models/`` that
defines a `BaseDetector` subclass and calls `register_family`; the evaluation, the
Dagster asset factory, the MLflow registry code, the CLI and ``/score`` read this
registry and need no change.

>>> sorted(families())[:2]
['campaign', 'isolation_forest']
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base import BaseDetector, InputKind
from models.thresholds import Contamination, KeyDayBudget, ThresholdStrategy

__all__ = [
    "DetectorFamily",
    "families",
    "get_family",
    "register_family",
    "strategy_from_dict",
    "strategy_to_dict",
    "unregister_family",
]

#: The modules of the families qabuse ships; importing one registers its family.
BUILTIN_MODULES = (
    "models.isolation_forest",
    "models.lof",
    "models.ocsvm",
    "models.sequence",
    "models.campaign",
    "models.user_level",
    "models.timing",
)


@dataclass(frozen=True)
class DetectorFamily:
    """One detector family, as the rest of qabuse sees it.

    Attributes:
        name: registry name (also the MLflow model's suffix and the CLI's choice).
        input_kind: ``rows``, ``sequences`` or ``graph``.
        entity: the entity its rows describe (``api_key`` or ``user``); scores of user
            rows are given to each key of the user.
        feature_service: the Feast feature service serving its inputs online.
        feature_names: its input columns, in order (sequence channels for sequences).
        detector: the `BaseDetector` subclass.
        params: constructor arguments, without ``threshold_strategy``.
        save: writes a fitted detector into a directory (no pickle).
        load: reads it back, trusting only the types the family names.
        description: one line for the UI and the registry.
        train_row_limit: rows the family trains on at most (a seeded subsample beyond).
    """

    name: str
    input_kind: InputKind
    entity: str
    feature_service: str
    feature_names: tuple[str, ...]
    detector: type[BaseDetector]
    save: Callable[[BaseDetector, Path], None]
    load: Callable[[Path], BaseDetector]
    description: str
    params: Mapping[str, Any] = field(default_factory=dict)
    train_row_limit: int | None = None

    def build(
        self, threshold_strategy: ThresholdStrategy | None = None, **overrides: Any
    ) -> BaseDetector:
        """An unfitted detector with the family's parameters (and any overrides)."""
        return self.detector(**{**self.params, **overrides}, threshold_strategy=threshold_strategy)


_FAMILIES: dict[str, DetectorFamily] = {}
_LOADED = False


def register_family(family: DetectorFamily, *, replace: bool = False) -> DetectorFamily:
    """Add ``family`` to the registry; a second family of the same name is an error."""
    if family.input_kind not in ("rows", "sequences", "graph"):
        raise ValueError(f"family {family.name!r}: unknown input kind {family.input_kind!r}")
    if not replace and family.name in _FAMILIES and _FAMILIES[family.name] != family:
        raise ValueError(f"a detector family named {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family (tests register toy families and take them out again)."""
    _FAMILIES.pop(name, None)


#: Extra modules to import (comma-separated), each registering a family of its own: how a
#: deployment adds a family without editing qabuse (every process that scores or trains
#: must see the same value).
PLUGINS_ENV = "QABUSE_DETECTOR_MODULES"


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        extra = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        for module in (*BUILTIN_MODULES, *extra):
            importlib.import_module(module)
        _LOADED = True


def families() -> dict[str, DetectorFamily]:
    """Every registered family, by name, in registration order."""
    _load_builtins()
    return dict(_FAMILIES)


def get_family(name: str) -> DetectorFamily:
    """The family called ``name``; a KeyError that lists the known ones otherwise."""
    known = families()
    try:
        return known[name]
    except KeyError:
        raise KeyError(
            f"no detector family {name!r}; registered: {', '.join(sorted(known))}"
        ) from None


def strategy_to_dict(strategy: ThresholdStrategy | None) -> dict[str, Any] | None:
    """A threshold strategy as JSON-ready data (for a saved detector's metadata)."""
    if strategy is None:
        return None
    if isinstance(strategy, KeyDayBudget):
        return {
            "kind": "key_day_budget",
            "budget": strategy.budget,
            "min_exceedances": strategy.min_exceedances,
            "tail_share": strategy.tail_share,
        }
    if isinstance(strategy, Contamination):
        return {"kind": "contamination", "contamination": strategy.contamination}
    raise TypeError(f"cannot store threshold strategy {strategy!r}")


def strategy_from_dict(data: Mapping[str, Any] | None) -> ThresholdStrategy | None:
    if data is None:
        return None
    if data.get("kind") == "key_day_budget":
        return KeyDayBudget(
            float(data["budget"]),
            min_exceedances=int(data.get("min_exceedances", 10)),
            tail_share=float(data.get("tail_share", 0.2)),
        )
    if data.get("kind") == "contamination":
        return Contamination(float(data["contamination"]))
    raise ValueError(f"unknown threshold strategy {json.dumps(dict(data))}")
