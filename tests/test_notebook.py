"""notebooks/quickstart.ipynb executes top to bottom (on its tiny config) in a fresh kernel; its install cell stops
with what to set while the repository address is unset, and installs the extra for the runtime's chip."""

import glob
import os
import pathlib
import subprocess
import sys

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


def install_cell() -> str:
  """The notebook's first code cell: it installs the package."""
  cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
  assert "pip" in cell.source and "REPO_URL" in cell.source
  return cell.source


@pytest.fixture
def fresh_runtime(monkeypatch):
  """As on a fresh Colab runtime: fedspa_jax is not importable; pip calls are recorded, not run."""
  monkeypatch.setitem(sys.modules, "fedspa_jax", None)  # importlib.util.find_spec then returns None
  calls = []
  monkeypatch.setattr(subprocess, "check_call", lambda command, **kwargs: calls.append(command))
  return calls


def test_install_cell_fails_with_what_to_set_while_the_address_is_unset(fresh_runtime, monkeypatch):
  monkeypatch.delenv("FEDSPA_JAX_REPOSITORY", raising=False)
  with pytest.raises(RuntimeError, match=r"^REPO_URL is unset: set it in this cell to the repository's pip address, "
                     r"e\.g\. REPO_URL = \"git\+https://github\.com/<owner>/fedspa-jax\.git\" \(docs/scaling\.md\)$"):
    exec(install_cell(), {})
  assert fresh_runtime == []


@pytest.mark.parametrize("chip, extra", [("nvidia", "cuda12"), ("tpu", "tpu"), (None, "")])
def test_install_cell_installs_the_extra_for_the_runtime_chip(fresh_runtime, monkeypatch, tmp_path, chip, extra):
  address = "git+https://example.invalid/fedspa-jax.git"
  monkeypatch.setenv("FEDSPA_JAX_REPOSITORY", address)
  # The devices the cell looks for: /dev/nvidia0, or a PCI device with Google's vendor id and a TPU v5e's device id.
  pci = tmp_path / "0000:00:05.0"
  pci.mkdir()
  (pci / "vendor").write_text("0x1ae0\n")
  (pci / "device").write_text("0x0063\n" if chip == "tpu" else "0x0042\n")  # 0x0042: Google's virtual NIC
  exists = os.path.exists
  monkeypatch.setattr(os.path, "exists", lambda p: chip == "nvidia" if p.startswith("/dev/nvidia") else exists(p))
  monkeypatch.setattr(glob, "glob", lambda pattern: [str(pci / "vendor")] if pattern.endswith("/vendor") else [])
  exec(install_cell(), {})
  package = f"fedspa-jax[{extra}] @ {address}" if extra else f"fedspa-jax @ {address}"
  assert fresh_runtime == [[sys.executable, "-m", "pip", "install", "--quiet", package]]
