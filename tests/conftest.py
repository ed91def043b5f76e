
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    # Every op allocates its outputs NaN-filled (indices: -7), so unwritten elements fail the checks.
    monkeypatch.setenv("NSA_CODEGEN_POISON_OUTPUTS", "1")


@pytest.fixture
def no_tuning_logs(monkeypatch, tmp_path):
    """Hide the committed tuning records (tests of the default schedules): an empty tune folder and
    no shipped logs."""
    import nsa_codegen.schedules as schedules
    monkeypatch.setenv("NSA_CODEGEN_TUNING_DIR", str(tmp_path / "no_tuning_logs"))
    monkeypatch.setattr(schedules, "tuning_logs_dir", lambda: None)


@pytest.fixture
def load_script():
    """load_script("benchmarks/x.py") -> the repo script imported as a module (its folder on sys.path
    first: the benchmarks import their siblings by name)."""
    def load(rel: str):
        path = ROOT / rel
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load
