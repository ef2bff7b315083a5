"""`python -m wrapssl ...`: the ``wrapssl`` command (train, embed, evaluate, plot, select)."""
import sys

from .cli import main

sys.exit(main())
