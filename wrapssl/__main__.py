"""`python -m wrapssl ...`: the ``wrapssl`` command (train, embed, evaluate, plot, select)."""
import importlib.util
import sys
from pathlib import Path

if getattr(sys.modules.get(__package__), "__file__", "") is None:
    # run from the folder that holds a checkout named wrapssl: Python took the checkout (no __init__.py) for a
    # namespace package `wrapssl`. Load this folder as the package, so that its __init__ runs.
    spec = importlib.util.spec_from_file_location(__package__, Path(__file__).resolve().parent / "__init__.py",
                                                  submodule_search_locations=[str(Path(__file__).resolve().parent)])
    sys.modules[__package__] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[__package__])

from .cli import main  # noqa: E402

sys.exit(main())
