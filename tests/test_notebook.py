"""notebooks/quickstart.ipynb is committed executed, with its outputs, and runs top to bottom
without warnings: a variable source, the good-data mask, per-band light curves, the lightkurve
bridge.

To refresh the committed outputs after a change: ``python tests/test_notebook.py --write``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

NB = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
#: what the executed notebook must show: the truth comparison, the mask, the per-band plot, lightkurve
EXPECTED = ("median pull", "good", "max |BJD_TDB - MJD_UTC|", "D1 visits", "files, e.g.")


def execute(nb) -> None:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": tempfile.mkdtemp(prefix="spxframe-nb-")}}).execute()


def check_outputs(nb) -> None:
    """Every code cell ran, in order; no warnings or errors; the figures and key lines are there."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert all(counts) and counts == sorted(counts), f"cells not executed in order: {counts}"
    outs = [o for c in code for o in c.outputs]
    stderr = [o.get("text", "") for o in outs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    errors = [o.get("ename") for o in outs if o.get("output_type") == "error"]
    assert not stderr and not errors, (stderr, errors)
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outs)
    for word in EXPECTED:
        assert word in text, word
    assert "Warning" not in text
    images = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the per-band plot, a channel plot and the lightkurve plot"


def test_committed_notebook_is_executed_with_outputs():
    check_outputs(nbformat.read(NB, as_version=4))


@pytest.mark.slow
def test_quickstart_notebook_runs():
    nb = nbformat.read(NB, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    execute(nb)
    check_outputs(nb)


if __name__ == "__main__":  # refresh the committed outputs
    nb = nbformat.read(NB, as_version=4)
    execute(nb)
    check_outputs(nb)
    if "--write" in sys.argv:
        nbformat.write(nb, NB)
        print(f"wrote {NB}")
