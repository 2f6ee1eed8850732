"""The registry of detector families: registration, look-up, plug-ins and stored strategies."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from models import registry
from models.base import BaseDetector
from models.registry import (
    DetectorFamily,
    families,
    get_family,
    register_family,
    strategy_from_dict,
    strategy_to_dict,
    unregister_family,
)
from models.thresholds import Contamination, KeyDayBudget
from qabuse_dagster.evaluation.families import resolve_names

TOY = "toy_distance"


class DistanceDetector(BaseDetector):
    """A toy family: distance from the training mean."""

    def __init__(self, power: float = 1.0, threshold_strategy: object = None) -> None:
        super().__init__(threshold_strategy)  # type: ignore[arg-type]
        self.power = power

    def _fit(self, X: NDArray[np.float64]) -> None:
        self.mean_ = X.mean(axis=0)

    def _score(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(np.abs(X - self.mean_).sum(axis=1) ** self.power, dtype=np.float64)

    def _explain(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.abs(X - self.mean_)


def _toy(name: str = TOY, **changes: object) -> DetectorFamily:
    family = DetectorFamily(
        name=name,
        input_kind="rows",
        entity="api_key",
        feature_service=f"api_key_{name}_v1",
        feature_names=("submissions_1m",),
        detector=DistanceDetector,
        save=lambda detector, directory: None,
        load=lambda directory: DistanceDetector(),
        description="distance from the mean (a test family)",
        params={"power": 2.0},
    )
    return dataclasses.replace(family, **changes)  # type: ignore[arg-type]


@pytest.fixture
def toy() -> Iterator[DetectorFamily]:
    family = register_family(_toy())
    yield family
    unregister_family(TOY)


def test_builtin_families_are_registered() -> None:
    known = families()
    assert {
        "isolation_forest",
        "lof",
        "ocsvm",
        "gru_autoencoder",
        "campaign",
        "user_isolation_forest",
    } <= set(known)
    for name, family in known.items():
        assert family.name == name
        assert family.input_kind in ("rows", "sequences", "graph")
        assert family.entity in ("api_key", "user")
        assert family.feature_names and family.description
        assert issubclass(family.detector, BaseDetector)


def test_build_applies_params_overrides_and_the_strategy() -> None:
    family = get_family("isolation_forest")
    detector = family.build(KeyDayBudget(0.02), n_estimators=7)
    assert isinstance(detector, family.detector)
    assert detector.get_params()["n_estimators"] == 7
    assert detector.threshold_strategy == KeyDayBudget(0.02)
    assert family.build().get_params()["n_estimators"] == family.params["n_estimators"]


def test_a_registered_family_is_seen_everywhere_and_removed_again(toy: DetectorFamily) -> None:
    assert get_family(TOY) is toy
    assert TOY in families()
    assert TOY in resolve_names("all")
    detector = toy.build(Contamination(0.1))
    assert isinstance(detector, DistanceDetector) and detector.power == 2.0
    rows = np.random.default_rng(0).normal(size=(200, 1))
    assert detector.fit(rows).predict(rows).mean() == pytest.approx(0.1, abs=0.01)
    unregister_family(TOY)
    assert TOY not in families()
    unregister_family(TOY)  # removing twice is harmless


def test_the_same_family_registers_twice_another_of_its_name_does_not(
    toy: DetectorFamily,
) -> None:
    assert register_family(toy) is toy
    other = _toy(description="another family that took the name")
    with pytest.raises(ValueError, match=f"{TOY!r} is already registered"):
        register_family(other)
    assert get_family(TOY) is toy
    register_family(other, replace=True)
    assert get_family(TOY) is other


def test_an_unknown_input_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown input kind 'pixels'"):
        register_family(_toy(name="toy_pixels", input_kind="pixels"))
    assert "toy_pixels" not in families()


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        get_family("no_such_family")
    message = str(info.value)
    assert "no_such_family" in message
    assert all(name in message for name in families())


def test_resolve_names() -> None:
    assert resolve_names("all") == list(families())
    assert resolve_names("lof, isolation_forest") == ["lof", "isolation_forest"]
    assert resolve_names(["ocsvm"]) == ["ocsvm"]
    with pytest.raises(KeyError, match="registered: "):
        resolve_names("lof,nope")
    with pytest.raises(ValueError, match="named twice"):
        resolve_names("lof,lof")


def test_a_plugin_module_registers_its_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment names extra modules in the environment; no qabuse file changes."""
    module = "qabuse_test_plugin_family"
    (tmp_path / f"{module}.py").write_text(
        "from models.registry import DetectorFamily, get_family, register_family\n"
        "import dataclasses\n"
        "FAMILY = register_family(dataclasses.replace(get_family('isolation_forest'), "
        "name='plugin_forest', description='a plug-in'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(registry.PLUGINS_ENV, f" {module} ,")
    monkeypatch.setattr(registry, "_LOADED", False)
    try:
        assert get_family("plugin_forest").description == "a plug-in"
    finally:
        unregister_family("plugin_forest")
        sys.modules.pop(module, None)


@pytest.mark.parametrize(
    "strategy",
    [
        None,
        Contamination(0.03),
        KeyDayBudget(0.02),
        KeyDayBudget(0.005, min_exceedances=3, tail_share=0.3),
    ],
)
def test_a_strategy_survives_json(strategy: Contamination | KeyDayBudget | None) -> None:
    import json

    stored = json.loads(json.dumps(strategy_to_dict(strategy)))
    assert strategy_from_dict(stored) == strategy


def test_unknown_strategies_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot store"):
        strategy_to_dict(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown threshold strategy"):
        strategy_from_dict({"kind": "oracle"})
