"""``python -m mplog._listener CONFIG``: the listener process (see ``loop``)."""

import sys

from .loop import main

sys.exit(main())
