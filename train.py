#!/usr/bin/env python
"""Pretrain a backbone self-supervised and report what it learned: `wrapssl train` (wrapssl/app.py) as a script.

    python train.py                      # SimCLR on Fashion-MNIST with a small ResNet, a few minutes on 2 CPU cores
    python train.py --help               # every flag, with its default and tuning advice
    accelerate launch --multi_gpu --num_processes 2 train.py --steps 50   # 2 processes (gloo without GPUs)
"""
import importlib.util
import sys
from pathlib import Path

if getattr(sys.modules.get("wrapssl"), "__file__", "") is None:
    # `python -m wrapssl.train` run from the folder that holds this checkout, named wrapssl: Python took the
    # checkout for a namespace package `wrapssl` (it has no __init__.py) and this file for wrapssl.train. Load the
    # package beside this file as `wrapssl`, as `python train.py` does.
    PACKAGE = Path(__file__).resolve().parent / "wrapssl"
    spec = importlib.util.spec_from_file_location("wrapssl", PACKAGE / "__init__.py",
                                                  submodule_search_locations=[str(PACKAGE)])
    sys.modules["wrapssl"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["wrapssl"])

from wrapssl.argparsing import quiet_openmp  # noqa: E402

quiet_openmp()  # before torch loads OpenMP
from wrapssl.app import main  # noqa: E402

if __name__ == "__main__":
    main()
