"""The notebooks in notebooks/ run top to bottom (tiny settings) and are committed clean.

Each notebook reads DMJ_NOTEBOOK_TINY=1 in its parameters cell and shrinks every step;
DMJ_NOTEBOOK_MODEL_DIR points it at a tiny random model directory (so the test does not
depend on the bundled model's size or quality) and DMJ_NOTEBOOK_WORKDIR keeps its files
in the test's temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.model_dirs import tiny_model_dir  # noqa: F401  (fixture, shared with other tests)

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["inference.ipynb", "finetune.ipynb"]
REPO_ROOT = NOTEBOOKS.parent


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), \
        f"{name} has outputs: clear them before committing"
    # The first code cell installs the package unless it is importable; a parameters cell
    # follows (tagged, so papermill-style tools can inject values too).
    assert "find_spec(\"dalle_mini_jax\")" in code[0].source and "pip" in code[0].source
    assert "parameters" in code[1].metadata.get("tags", [])
    assert "DMJ_NOTEBOOK_TINY" in code[1].source


def _kernel_env(tmp_path: Path, model_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The kernel is a fresh process: one CPU device is enough there (the test session's
    # 8 fake devices would only make the tiny training split its batch 8 ways).
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    env.update(DMJ_NOTEBOOK_TINY="1", DMJ_NOTEBOOK_MODEL_DIR=str(model_dir),
               DMJ_NOTEBOOK_WORKDIR=str(tmp_path / "work"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return env


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, tiny_model_dir):  # noqa: F811
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=_kernel_env(tmp_path, tiny_model_dir))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    # Every code cell ran, and the image cells displayed something.
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    shown = sum(1 for c in code for o in c.outputs
                if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {}))
    assert shown >= 2, f"{name} displayed {shown} images"
