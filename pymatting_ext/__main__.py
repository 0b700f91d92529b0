"""python -m pymatting_ext: the pymatting-ext command (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
