"""Where the shipped templates/ and schedules/ are: inside the installed package, or the source tree."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _package_dir(package: str, source_folder: str) -> Path:
    try:
        mod = importlib.import_module(package)
        return Path(next(iter(mod.__path__)))
    except ModuleNotFoundError:
        # Running from a source checkout (PYTHONPATH=repo): the folders sit beside nsa_codegen/.
        path = _SOURCE_ROOT / source_folder
        if not path.is_dir():
            raise FileNotFoundError(f"cannot find {source_folder}/: nsa_codegen is neither installed "
                                    f"with its data nor run from a source checkout") from None
        return path


def schedules_dir() -> Path:
    return _package_dir("nsa_codegen.schedule_files", "schedules")


def tuning_logs_dir() -> Path | None:
    """The tuning records shipped with the package (or the source tree's), if any."""
    try:
        return _package_dir("nsa_codegen.tuning_files", "tuning_logs")
    except FileNotFoundError:
        return None


def templates_dir() -> Path:
    return _package_dir("nsa_codegen.templates", "templates")


def template_module(family: str) -> ModuleType:
    """Import templates/<family>.py (as nsa_codegen.templates.<family>)."""
    name = f"nsa_codegen.templates.{family}"
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in ("nsa_codegen.templates", name):
            raise
    path = templates_dir() / f"{family}.py"
    if not path.exists():
        raise FileNotFoundError(f"no template for kernel family {family!r} at {path}")
    # A source checkout: templates/ stands in for the nsa_codegen.templates package (so that the
    # templates' relative imports, e.g. `from ._problem import check_problem`, resolve).
    package = ModuleType("nsa_codegen.templates")
    package.__path__ = [str(templates_dir())]
    package.__package__ = "nsa_codegen.templates"
    sys.modules.setdefault("nsa_codegen.templates", package)
    return importlib.import_module(name)
