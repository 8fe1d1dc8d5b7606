"""notebooks/quickstart.ipynb executes top to bottom (on its tiny config) in a fresh kernel."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDSPA_NOTEBOOK_SMOKE", "1")  # the kernel inherits the environment
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 4  # three comparison figures and FedSpa's mask distances
  assert (tmp_path / "runs" / "quickstart" / "comparison.md").is_file()
  tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
  assert any("fedspa" in t and "fedavg" in t for t in tables)
