"""``python -m datd``: the ``datd`` command."""

from .cli import main

main(prog_name="datd")
