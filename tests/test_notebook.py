"""examples/quickstart.ipynb run top to bottom by a real Jupyter kernel, as a person would run it."""

import os

import pytest

from conftest import ROOT
from xla_flags import xla_flags

pytestmark = pytest.mark.slow  # every test here starts processes of its own

REASON = 'the notebook test needs the test extra: pip install -e ".[test]"'
nbclient = pytest.importorskip("nbclient", reason=REASON)
nbformat = pytest.importorskip("nbformat", reason=REASON)
pytest.importorskip("ipykernel", reason=REASON)
pytest.importorskip("matplotlib", reason=REASON)


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    # one CPU device, as on a laptop (conftest simulates 4 for this process); gptjax importable from the
    # checkout even where it is not installed
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # a failing cell raises CellExecutionError with its source and traceback

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "done: 150 steps" in text and "perplexity of a text like the corpus" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot was drawn
