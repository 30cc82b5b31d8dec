"""``python -m normfree``: the ``normfree`` command (see `normfree.cli`)."""
import sys

from .cli import main

sys.exit(main())
