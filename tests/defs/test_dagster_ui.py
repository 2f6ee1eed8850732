"""The Dagster UI in a real browser: the asset graph, the evaluation's metadata, the drift checks.

The real ``dagster-webserver`` serves the session's instance (the graph the
``pipeline_run`` fixture materialised, plus one ``monitoring_job`` run made here) to
headless Chromium. The UI is a React app: each step waits for what the page shows, and
Dagster's GraphQL endpoint, which the page itself reads, says what that should be.
Screenshots go to ``test-artifacts/dagster-ui/``.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

import pytest
from support.browser import artifacts_dir, headless_chromium
from support.dagster_webserver import DagsterWebserver, dagster_webserver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Assets of three groups (telemetry, models, monitoring) that the global graph must show.
GRAPH_ASSETS = frozenset({"raw_telemetry", "ensemble_model", "champion_model", "feature_drift"})
EVALUATION = "ensemble_evaluation"
METRICS = ("recall", "precision_at_k", "benign_key_day_alert_rate")
DRIFT = "feature_drift"
#: Levels that split the two checks (every input is over PSI 0, none is near 100), so the
#: page must show each check its own result, with the level this run used; judged, for
#: the page, on the session twin's few keys.
DRIFT_LEVELS = {"psi_warn": 0.0, "psi_error": 100.0, "min_keys": 1}


class CheckShown(NamedTuple):
    """What the checks tab says of one check."""

    listed: str  # its result in the list of checks: Dagster's execution status
    result: str  # its "Evaluation result" once selected (dagster 1.13 words a pass "Passed")
    level: str  # the metadata key of the level it was held to


CHECKS = {
    "psi_below_warn": CheckShown("Failed", "Failed", "psi_warn"),
    "psi_below_error": CheckShown("Succeeded", "Passed", "psi_error"),
}
WAIT_S = 30.0
#: The global graph, tall enough that its groups, expanded, fit after a zoom step or two;
#: further out, the graph draws its nodes without names.
GRAPH_WINDOW = (1800, 2400)
MAX_ZOOM_OUTS = 3
ASSET_WINDOW = (1400, 1000)
#: Dagster opens its first-visit dialog this long after the app loads (``CommunityNux``).
NUX_DELAY_S = 1.0

_ASSET_NODES = "{ assetNodes { assetKey { path } groupName } }"
_LATEST_MATERIALISATION = """
query Latest($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries { label ... on FloatMetadataEntry { floatValue } }
      }
    }
  }
}
"""
_CHECKS = """
query Checks($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      assetChecksOrError {
        ... on AssetChecks {
          checks { name description executionForLatestMaterialization { runId status } }
        }
      }
    }
  }
}
"""


@pytest.fixture(scope="module")
def drift_run(pipeline_run: Any) -> Any:
    """``monitoring_job`` on the session's instance, as ``test_monitoring`` runs it."""
    from dagster import DagsterInstance

    from qabuse_dagster.definitions import build_definitions
    from qabuse_dagster.pipeline import QUIET_RUN_CONFIG

    run_config = {**QUIET_RUN_CONFIG, "ops": {DRIFT: {"config": DRIFT_LEVELS}}}
    job = build_definitions().resolve_job_def("monitoring_job")
    result = job.execute_in_process(instance=DagsterInstance.get(), run_config=run_config)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {name: shown.listed == "Succeeded" for name, shown in CHECKS.items()}
    return result


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium(*ASSET_WINDOW) as driver:
        yield driver


@pytest.fixture(scope="module")
def webserver(
    browser: Any, drift_run: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterWebserver]:
    # After the browser: where Chromium is missing locally, the test skips before the start.
    log = tmp_path_factory.mktemp("dagster-webserver") / "dagster-webserver.log"
    with dagster_webserver(log) as server:
        yield server


@pytest.fixture(scope="module")
def shots() -> Path:
    path = artifacts_dir() / "dagster-ui"
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):  # this run's pictures only
        old.unlink()
    return path


def _wait(browser: Any, what: str, probe: Callable[[Any], Any], within_s: float = WAIT_S) -> Any:
    """Poll ``probe`` until it is truthy; an element React replaced meanwhile means: again."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    stale = (StaleElementReferenceException,)
    try:
        return WebDriverWait(browser, within_s, 0.2, ignored_exceptions=stale).until(probe)
    except TimeoutException:
        message = f"{what}: not within {within_s:.0f} s at {browser.current_url}"
        raise AssertionError(message) from None


def _page_text(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    return cast(str, browser.find_element(By.TAG_NAME, "body").text)


def _showing(*texts: str) -> Callable[[Any], bool]:
    """A probe for :func:`_wait`: the page shows every one of ``texts``."""

    def probe(browser: Any) -> bool:
        page = _page_text(browser)
        return all(text in page for text in texts)

    return probe


_GRAPH_NODES_IN_VIEW = """
const view = document.querySelector('[data-svg-viewport]');
if (!view) return [];
const v = view.getBoundingClientRect();
return Array.from(view.querySelectorAll('foreignObject')).filter(node => {
  const r = node.getBoundingClientRect();
  return r.top >= v.top && r.bottom <= v.bottom && r.left >= v.left && r.right <= v.right;
}).map(node => Array.from(node.querySelectorAll('*')).filter(e => e.children.length === 0)
  .map(e => e.textContent.trim()).filter(Boolean)).filter(texts => texts.length);
"""


def _graph_nodes(browser: Any) -> list[list[str]]:
    """The texts of each graph node wholly in view: its name first.

    Each node is HTML in a ``foreignObject`` of the graph's SVG. The graph draws only the
    nodes near the view, and middle-truncates long names (``ensemb…_evaluation``).
    """
    return cast(list[list[str]], browser.execute_script(_GRAPH_NODES_IN_VIEW))


def _graph_names(browser: Any) -> set[str]:
    return {texts[0] for texts in _graph_nodes(browser)}


def _group_counts(browser: Any) -> dict[str, int | None]:
    """Each collapsed group in view: how many assets its status badges count.

    None while the node still says "25 assets (fetching statuses)".
    """
    return {
        name: sum(map(int, badges)) if all(b.isdigit() for b in badges) else None
        for name, *badges in _graph_nodes(browser)
    }


def _table_value(browser: Any, key: str) -> str:
    """The value cell of the metadata table row whose key cell reads ``key``."""
    from selenium.webdriver.common.by import By

    row = browser.find_element(By.XPATH, f"//table//tr[td[1][normalize-space()='{key}']]")
    return cast(str, row.find_element(By.XPATH, "./td[2]").text.strip())


def test_the_asset_graph_shows_the_groups_then_the_assets_and_no_first_visit_dialog(
    browser: Any, webserver: DagsterWebserver, shots: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    nodes = webserver.graphql(_ASSET_NODES)["assetNodes"]
    keys = {"/".join(node["assetKey"]["path"]) for node in nodes}
    assert keys >= GRAPH_ASSETS
    sizes = Counter(node["groupName"] for node in nodes)
    assert set(sizes) >= {"telemetry", "models", "monitoring"}

    browser.set_window_size(*GRAPH_WINDOW)
    browser.get(webserver.url + "/asset-groups")
    loaded = time.monotonic()
    # The global lineage opens with each group collapsed to one node, whose badges count
    # its assets by status once the statuses have loaded: every asset, in every group.
    _wait(browser, f"the asset groups {dict(sizes)}", lambda b: _group_counts(b) == sizes)
    browser.save_screenshot(str(shots / "1-asset-groups.png"))

    # ⌥E: "Expand all groups", the shortcut the graph's own settings menu lists.
    ActionChains(browser).key_down(Keys.ALT).send_keys("e").key_up(Keys.ALT).perform()
    _wait(browser, "the groups expanded", lambda b: len(keys & _graph_names(b)) > len(sizes))
    zoom_out = browser.find_element(By.CSS_SELECTOR, "button:has([aria-label='zoom_out'])")
    # The graph is taller than the window: step out until all four are in view.
    for zoom_outs in itertools.count():
        try:
            _wait(browser, "the assets", lambda b: _graph_names(b) >= GRAPH_ASSETS, 3)
            break
        except AssertionError:
            if zoom_outs == MAX_ZOOM_OUTS:
                shown = sorted(_graph_names(browser))
                raise AssertionError(f"the graph shows only {shown} in view") from None
            zoom_out.click()
    browser.save_screenshot(str(shots / "2-asset-graph.png"))

    # The instance turns the first-visit dialog (nux) off: it would be open by now.
    assert webserver.graphql("{ shouldShowNux }") == {"shouldShowNux": False}
    time.sleep(max(0.0, loaded + NUX_DELAY_S + 0.5 - time.monotonic()))
    assert not browser.find_elements(By.CSS_SELECTOR, ".bp5-dialog, [role=dialog]")
    assert "Join the Dagster community" not in _page_text(browser)


def test_the_evaluation_shows_its_latest_materialisations_metrics(
    browser: Any, webserver: DagsterWebserver, shots: Path
) -> None:
    asset = webserver.graphql(_LATEST_MATERIALISATION, key={"path": [EVALUATION]})
    (latest,) = asset["assetOrError"]["assetMaterializations"]
    values = {e["label"]: e.get("floatValue") for e in latest["metadataEntries"]}
    assert all(values.get(metric) is not None for metric in METRICS), values

    browser.set_window_size(*ASSET_WINDOW)
    browser.get(f"{webserver.url}/assets/{EVALUATION}?view=events")
    # The newest event is the one selected: the run the GraphQL answer names.
    materialised = f"Materialized in run {latest['runId'][:8]}"
    _wait(browser, materialised, _showing(materialised))
    _wait(browser, "the metadata table", _showing(*METRICS))
    for metric in METRICS:
        assert float(_table_value(browser, metric)) == pytest.approx(values[metric]), metric
    browser.save_screenshot(str(shots / "3-ensemble-evaluation-metadata.png"))


def test_the_drift_checks_show_this_runs_results(
    browser: Any, webserver: DagsterWebserver, drift_run: Any, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    node = webserver.graphql(_CHECKS, key={"path": [DRIFT]})["assetNodeOrError"]
    checks = {c["name"]: c for c in node["assetChecksOrError"]["checks"]}
    assert set(checks) == set(CHECKS)
    for name, shown in CHECKS.items():
        latest = checks[name]["executionForLatestMaterialization"]
        assert (latest["runId"], latest["status"]) == (drift_run.run_id, shown.listed.upper())

    browser.set_window_size(*ASSET_WINDOW)
    browser.get(f"{webserver.url}/assets/{DRIFT}?view=checks")

    def listed(b: Any) -> dict[str, str]:
        """Each check's line in the list: its name (the ``title``), then its result."""
        rows = {}
        for name in CHECKS:
            found = b.find_elements(
                By.XPATH,
                f"//*[@title='{name}']/ancestor::*[contains(., 'Failed') "
                "or contains(., 'Succeeded')][1]",
            )
            rows[name] = found[0].text if found else ""
        return rows

    expected = {name: f"{name}\n{shown.listed}" for name, shown in CHECKS.items()}
    _wait(browser, "both checks with their results", lambda b: listed(b) == expected)
    for index, (name, shown) in enumerate(CHECKS.items(), start=4):
        browser.find_element(By.XPATH, f"//*[@title='{name}']").click()
        # The detail pane is this check's once its own description is there.
        description = checks[name]["description"]
        result = f"Evaluation result\n{shown.result}"
        _wait(browser, f"{name}'s latest execution", _showing(description, result))
        level = _table_value(browser, shown.level)
        assert float(level) == pytest.approx(DRIFT_LEVELS[shown.level])
        browser.save_screenshot(str(shots / f"{index}-feature-drift-{name}.png"))
