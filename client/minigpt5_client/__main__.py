"""`python -m minigpt5_client generate|chat ...` (the same commands as `minigpt5 generate|chat`)."""

import sys

from .cli import main

sys.exit(main())
