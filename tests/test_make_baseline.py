"""benchmarks/make_baseline.py: a commit's source and its own prebuilt kernels, packed for an A/B run."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _head():
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.mark.compile
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.skipif(_head() is None, reason="not a git checkout")
def test_baseline_holds_the_commit_and_kernels_built_from_its_own_templates(tmp_path):
    sha = _head()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_baseline.py"), "HEAD", "--config",
                    "examples/window512_fp16.yaml", "--out", str(tmp_path), "-j", "2"], cwd=ROOT, check=True,
                   env={**os.environ, "TILELANG_CACHE_DIR": str(tmp_path / "tl")})
    with tarfile.open(tmp_path / "baseline.tar.xz") as tar:
        names = tar.getnames()
        assert tar.extractfile("REV").read().decode().strip() == sha
        kernels = [n for n in names if n.startswith("gen/sm90/sm90__window_") and n.endswith("/kernel.cu")]
        assert {n.split("__")[1] for n in kernels} == {"window_fwd", "window_bwd_dq", "window_bwd_dkdv"}, names
        # the archive's source is the commit's (its template text), not whatever is installed here
        archived = tar.extractfile("src/templates/window_attention.py").read()
    committed = subprocess.run(["git", "-C", str(ROOT), "show", f"{sha}:templates/window_attention.py"],
                               check=True, capture_output=True).stdout
    assert archived == committed
