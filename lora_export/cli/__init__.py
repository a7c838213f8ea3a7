"""The `lora-export` command line: the group and its error handling in main, the commands in make, packaging and ship.

Importing this package imports no torch: each command imports the library it calls when it runs.
"""

from . import make, packaging, ship  # noqa: F401  (registers the commands)
from .main import main

__all__ = ["main"]
