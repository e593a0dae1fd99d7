"""The roost command line."""

from roost import __version__

VERSION_LINE = f"roost {__version__}"  # what `roost --version` prints
