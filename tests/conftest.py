
import pytest
import torch


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
