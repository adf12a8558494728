"""``python -m engine`` runs the ``ferry`` command line."""

import sys

from engine.cli.main import main

sys.exit(main())
