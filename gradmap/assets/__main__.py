"""`python -m gradmap.assets`."""

import sys

from gradmap.assets.cli import main

sys.exit(main())
