"""The notebooks of notebooks/: stored without outputs, and each one runs top to bottom.

Each notebook is executed with nbclient on a kernel of this interpreter (the venv's
python), in a working directory of its own and with none of the test session's qabuse,
Dagster, BentoML, MLflow or Feast settings: a notebook sets its own, as it would for a
reader. A failing cell fails the test with that cell's error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: Settings a notebook must make itself, so none is inherited from the test session.
_OWN_SETTINGS = ("QABUSE_", "DAGSTER_", "BENTOML_", "MLFLOW_", "FEAST_")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Expected:
    """What a run of one notebook must show, beyond running."""

    #: Seconds any cell may take: a guard against a hang, several times its time.
    timeout_s: int
    #: Plots (``image/png`` outputs) it draws.
    plots: int
    #: Text its outputs hold.
    shows: tuple[str, ...]


EXPECTED = {
    "telemetry-wrappers": Expected(
        timeout_s=120,
        plots=0,
        shows=("basic_simulator", "Simulator", "default.qubit", "valid contract v1 records"),
    ),
    "feature-pipeline": Expected(timeout_s=120, plots=1, shows=("largest difference 0",)),
    "models": Expected(timeout_s=240, plots=2, shows=("gru_autoencoder", "weights.safetensors")),
    "scoring-server": Expected(timeout_s=420, plots=2, shows=("is @champion", "arrived", "429")),
}


def _notebook(name: str) -> Any:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=nbformat.NO_CONVERT)


def test_the_four_notebooks_exist_and_are_stored_without_outputs() -> None:
    stored = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert set(EXPECTED) <= {path.stem for path in stored}
    for path in stored:
        notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        nbformat.validate(notebook)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            assert cell.outputs == [], f"{path.name}, cell {index}: outputs are stored"
            assert cell.execution_count is None, f"{path.name}, cell {index}: it was executed"


def _kernel(tmp_path: Path) -> AsyncKernelManager:
    """A kernel of this interpreter, whatever kernels the user has installed."""
    spec = tmp_path / "kernels" / "qabuse-python"
    write_kernel_spec(spec)
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return AsyncKernelManager(kernel_name=spec.name, kernel_spec_manager=specs)


def _kernel_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_OWN_SETTINGS)}


def _outputs(notebook: Any) -> list[Any]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def _text(output: Any) -> str:
    if output.output_type == "stream":
        return str(output.text)
    data = output.get("data", {})
    return str(data.get("text/plain", "")) + str(data.get("text/html", ""))


@dataclass(frozen=True)
class Executed:
    """One notebook after its run: the cells with their outputs, or why it failed."""

    notebook: Any
    workdir: Path
    failure: str | None


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Executed]:
    """The four notebooks run at once: each kernel is a process of its own, so the quick
    ones run beside the scoring server's training instead of after it."""
    import asyncio

    runs = {}
    for name, expected in EXPECTED.items():
        root = tmp_path_factory.mktemp(f"notebook-{name}")
        workdir = root / "cwd"
        workdir.mkdir()
        notebook = _notebook(name)
        client = NotebookClient(
            notebook,
            km=_kernel(root),
            timeout=expected.timeout_s,
            startup_timeout=120,
            resources={"metadata": {"path": str(workdir)}},
        )
        runs[name] = (notebook, workdir, client)

    async def run(client: NotebookClient) -> str | None:
        try:
            await client.async_execute(env=_kernel_env())
        except CellExecutionError as exc:
            return _ANSI.sub("", str(exc))
        return None

    async def run_all() -> list[str | None]:
        return await asyncio.gather(*(run(client) for _, _, client in runs.values()))

    failures = asyncio.run(run_all())
    return {
        name: Executed(notebook, workdir, failure)
        for (name, (notebook, workdir, _)), failure in zip(runs.items(), failures, strict=True)
    }


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(max(expected.timeout_s for expected in EXPECTED.values()))
@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_notebook_runs_top_to_bottom(name: str, executed: dict[str, Executed]) -> None:
    expected = EXPECTED[name]
    run = executed[name]
    if run.failure is not None:
        pytest.fail(f"{name}.ipynb failed:\n{run.failure}", pytrace=False)

    outputs = _outputs(run.notebook)
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    plots = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(plots) == expected.plots, f"{name}: {len(plots)} plots"
    shown = "\n".join(_text(out) for out in outputs)
    missing = [text for text in expected.shows if text not in shown]
    assert not missing, f"{name}: the outputs lack {missing}"
    # It leaves nothing behind in the working directory (its state lives in a temporary one).
    assert not any(run.workdir.iterdir()), sorted(p.name for p in run.workdir.iterdir())
