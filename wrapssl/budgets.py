"""Temporary re-export; removed at integration. Label budgets live in wrapssl.evaluate.budgets."""
from .evaluate.budgets import *  # noqa: F401,F403
