"""``python -m normfree``: the ``normfree`` command (see `normfree.app.cli`)."""
import sys

from .app.cli import main

sys.exit(main())
