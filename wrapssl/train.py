"""`python -m wrapssl.train`: the app's name before it became wrapssl/app.py, kept so that commands written
for it (`accelerate launch -m wrapssl.train ...`) still run. Same as `wrapssl train`."""
from .argparsing import quiet_openmp

if __name__ == "__main__":
    quiet_openmp()  # before torch loads OpenMP
    from .app import main

    main()
