"""README's install and test commands are what CI runs; the installed package ships its data."""
import importlib.metadata
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    install = blocks[0].strip().splitlines()[0]
    test = blocks[1].strip().splitlines()[0]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.strip().startswith("#")]
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)


def test_installed_distribution_ships_templates_and_schedules():
    # The pip-installed distribution (a dist-info), not a build's egg-info left in the source tree.
    dists = [d for d in importlib.metadata.distributions(name="nsa-codegen")
             if str(getattr(d, "_path", "")).endswith(".dist-info")]
    if not dists:
        pytest.skip("nsa-codegen is not pip-installed here")
    names = {str(f) for f in dists[0].files or []}
    if any("__editable__" in n for n in names):
        pytest.skip("editable install: data stays in the source tree")
    assert "nsa_codegen/templates/__init__.py" in names
    assert "nsa_codegen/schedule_files/__init__.py" in names
    assert "nsa_codegen/schedule_files/sm90.yaml" in names
    assert any(n.startswith("nsa_codegen/tuning_files/sm90/") for n in names)
    assert "nsa_codegen/cli.py" in names
