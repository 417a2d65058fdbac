"""``python -m capvst`` is the ``capvst`` command."""

from .cli import main

main()
