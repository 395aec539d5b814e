"""Kept for imports written against the first release: the errors live in :mod:`aprender.errors`."""
from ..errors import *  # noqa: F401,F403
from ..errors import __all__  # noqa: F401
