#!/usr/bin/env python
"""Pretrain a backbone self-supervised and report what it learned: `wrapssl train` (wrapssl/app.py) as a script.

    python train.py                      # SimCLR on Fashion-MNIST with a small ResNet, a few minutes on 2 CPU cores
    python train.py --help               # every flag, with its default and tuning advice
    accelerate launch --multi_gpu --num_processes 2 train.py --steps 50   # 2 processes (gloo without GPUs)
"""
from wrapssl.argparsing import quiet_openmp

quiet_openmp()  # before torch loads OpenMP
from wrapssl.app import main  # noqa: E402

if __name__ == "__main__":
    main()
