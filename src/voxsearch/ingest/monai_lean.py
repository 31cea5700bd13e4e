"""Import the MONAI modules preprocessing uses without running ``monai/__init__.py``.

MONAI's package ``__init__`` imports every one of its subpackages, among them ``monai.apps.mmars`` ->
``monai.networks.nets.transchex`` -> Hugging Face's BERT: about 10 s of a fresh process on this
project's 2-core machine, against about 4 s for the transforms and ``MetaTensor`` alone. Every Ray
worker that preprocesses (ingest actors, embed model actors, training's data actors) pays it once per
command, which on a small job is most of the job (issue 18).

So ``monai`` and ``monai.apps`` are registered as bare package modules (their search path, no
``__init__`` code run), ``monai.data`` is imported first (MONAI's own ``__init__`` order; importing
``monai.transforms`` first runs into a circular import), and any submodule loads normally on demand.
A process that already imported MONAI keeps it; any failure falls back to the plain import. What
``__init__`` would have done and is skipped: warning filters for third-party deprecations and a CUDA
TF32 check (the transforms here run on CPU tensors). ``tests/test_monai_lean.py`` checks that both
imports preprocess a volume to the same bytes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger(__name__)


def _bare_package(name: str):
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not an importable package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _forget_partial() -> None:
    for name in [m for m in sys.modules if m == "monai" or m.startswith("monai.")]:
        del sys.modules[name]


def load() -> None:
    """Make ``monai.data`` and ``monai.transforms`` importable, cheaply where possible; idempotent."""
    if "monai.transforms" in sys.modules and "monai.data" in sys.modules:
        return
    if "monai" in sys.modules:  # imported the ordinary way (or half-way): let Python finish it
        importlib.import_module("monai.data")
        importlib.import_module("monai.transforms")
        return
    try:
        root = _bare_package("monai")
        try:
            root.__version__ = version("monai")
        except PackageNotFoundError:  # a source checkout: its own version file
            root.__version__ = importlib.import_module("monai._version").get_versions()["version"]
        _bare_package("monai.apps")
        importlib.import_module("monai.data")
        importlib.import_module("monai.transforms")
    except Exception as exc:  # another MONAI layout: pay for the full import instead
        log.debug("lean MONAI import failed (%s); importing the whole package", exc)
        _forget_partial()
        importlib.import_module("monai.data")
        importlib.import_module("monai.transforms")
