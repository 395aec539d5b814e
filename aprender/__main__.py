"""``python -m aprender``: the aprender command line."""
import sys

from .cli import main

sys.exit(main())
