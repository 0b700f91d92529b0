"""python -m pymatting_ext: the pymatting-ext command (see app/cli.py)."""
import sys

from .app.cli import main

sys.exit(main())
