"""docs/conventions.ipynb runs top to bottom on the sample data, draws every plot and states its
numbers from the cells that compute them; it is committed without outputs."""
import os

import nbclient
import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "docs" / "conventions.ipynb"
SECTIONS = 7


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.outputs and c.execution_count is None for c in code_cells(nb))


@pytest.mark.slow
def test_the_notebook_runs_and_draws_every_section(sample_dir, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(sample_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a cell that raises fails here (nbclient.exceptions.CellExecutionError, with its traceback)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    plots = [o for o in outputs if "image/png" in o.get("data", {})]
    prose = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(plots) >= SECTIONS and len(prose) >= SECTIONS
    assert all(len(o["data"]["image/png"]) > 10_000 for o in plots)  # base64 of a real figure
    # the sentences are the computed numbers, not placeholders
    assert not [p for p in prose if "nan" in p.split() or "{" in p]
