"""The example notebook runs top to bottom on the embedded default model."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "walkthrough.ipynb"


@pytest.mark.real
def test_walkthrough_notebook_executes(tmp_path, smollm2):  # smollm2: the GGUF cache exists before the kernel starts
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.output_type == "stream")
    assert "torch.Size([2, 30, 576])" in text
    assert "['per_fact.jsonl', 'report.html', 'results.json', 'run.json']" in text
