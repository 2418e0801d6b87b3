"""`python -m minigpt5_client generate|chat|gateway ...` (the same commands as `minigpt5 generate|chat|gateway`)."""

import sys

from .cli import main

sys.exit(main())
