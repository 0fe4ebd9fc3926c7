"""``bncal.nn``: the batch renormalisation modules, defined in :mod:`bncal.torch.nn`.

Kept as a module of its own so that ``bncal.nn.BatchRenorm2d`` (and models pickled with it)
keep working.
"""

from .torch.nn import *  # noqa: F401,F403
from .torch.nn import __all__  # noqa: F401
