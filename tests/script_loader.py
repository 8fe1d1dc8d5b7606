"""Imports a script of scripts/ as a module, for the tests of the scripts (they are files, not a package)."""

import importlib.util
import pathlib
import sys

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
  """scripts/<name>.py as the module `name`; scripts/ is on sys.path only while it runs (for its sibling imports)."""
  before = list(sys.path)
  sys.path.insert(0, str(SCRIPTS))
  try:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path[:] = before
