"""The package's version, written in this one place (setup.py and --version read it)."""
__version__ = "0.1.0"
