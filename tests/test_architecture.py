"""ARCHITECTURE.md stays true: every repository path it names in backquotes exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_path_architecture_names_exists():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    paths = [p for p in re.findall(r"`([^`\s]+)`", text) if "/" in p and not p.startswith("sm")]
    assert len(paths) >= 15
    missing = [p for p in paths if not (ROOT / p.replace("<arch>", "sm90")).exists()
               and not p.startswith(("generated/", "benchmarks/results/"))]
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"
