"""``python -m flowscope`` runs the command line."""

import sys

from flowscope.cli import main

sys.exit(main())
