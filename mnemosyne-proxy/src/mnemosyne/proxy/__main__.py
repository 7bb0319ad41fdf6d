"""``python -m mnemosyne.proxy``: run one device proxy."""

import sys

from mnemosyne.proxy.cli import main

sys.exit(main())
