"""Execute the notebooks headless (nbclient, kernel "python3" of this venv) with small parameters injected.

Needs the ipykernel kernel spec of the venv; if it is missing: ``.venv/bin/python -m ipykernel install --sys-prefix``
(done by the fixture below when possible).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).parents[1]
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(scope="module")
def kernel():
    """Make sure a "python3" kernel spec exists (the venv's ipykernel), installing it into the venv if needed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True, capture_output=True)
    return "python3"


def run_notebook(path: Path, overrides: dict, kernel_name: str, cwd: Path) -> nbformat.NotebookNode:
    """Execute a notebook with a cell of `overrides` inserted after its "parameters" cell (like papermill)."""
    nb = nbformat.read(str(path), as_version=4)
    pos = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else v}" for k, v in overrides.items())
    nb.cells.insert(pos + 1, nbformat.v4.new_code_cell("# injected parameters\n" + src))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebooks_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(str(path), as_version=4)
        assert "parameters" in nb.cells[0].metadata.get("tags", []), path.name
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.slow
def test_view_volume_notebook(kernel, tmp_path):
    nb = run_notebook(NOTEBOOKS / "01_view_volume.ipynb", {"k": 3}, kernel, tmp_path)
    assert _images(nb) >= 2


@pytest.mark.slow
def test_inspect_model_notebook(kernel, tmp_path):
    log = tmp_path / "training_log.jsonl"
    log.write_text('{"iteration": 1, "loss": 0.3, "mim": 0.3, "stage": 0.0}\n'
                   '{"iteration": 10, "loss": 0.1, "sm": 0.02, "daa": 0.1, "stage": 1.0, "prototypes_used": 4}\n')
    nb = run_notebook(NOTEBOOKS / "02_inspect_model.ipynb",
                      {"untrained": True, "volumes": ["IXI015_hyper"], "log_path": str(log)}, kernel, tmp_path)
    assert _images(nb) >= 3  # montage, prototypes, curves
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "freshly initialised" in text and "score" in text


@pytest.mark.slow
def test_inspect_model_notebook_takes_the_bundle_chain_for_a_4d_multichannel_model(kernel, tmp_path):
    """Own volumes and a model with settings the demo never uses: channels of a 4D input, bright polarity."""
    import nibabel as nib
    import numpy as np
    import torch

    from monai_dnprd.anomaly_map import AnomalyMapper
    from monai_dnprd.checkpoint import export_model
    from monai_dnprd.demo import prepare_demo_data
    from monai_dnprd.networks import DNPConFormer

    src = nib.load(str(prepare_demo_data()["test_images"] / "IXI015_hyper.nii.gz"))
    x = np.asarray(src.dataobj, dtype=np.float32)
    image = tmp_path / "two_sequences.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([x, x.max() - x], -1), src.affine), str(image))  # (X, Y, Z, 2)
    torch.manual_seed(0)
    params = {"modality": "mri", "channels": [1, 0], "k": 1, "img_size": 32, "margin": 4, "spacing": None,
              "z_sigma": 1.0, "score_q": 0.01, "polarity": "bright"}
    net = DNPConFormer(img_size=32, patch_size=8, in_channels=6, vit="tiny", depth=2, num_prototypes=4)
    model = export_model(tmp_path / "run" / "models" / "model.pt", AnomalyMapper(net, sigma=1.0), params)
    nb = run_notebook(NOTEBOOKS / "02_inspect_model.ipynb", {"model_path": str(model), "image_paths": [str(image)]},
                      kernel, tmp_path)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "'channels': [1, 0]" in text and "'polarity': 'bright'" in text
    assert f"map of shape {x.shape} on the grid of the input ({x.shape})" in text
    assert _images(nb) >= 2  # montage, prototypes (no training log for this model: said so, no figure)
    assert "training_log" in text or "no training log" in text
