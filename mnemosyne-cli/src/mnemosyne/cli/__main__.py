"""``python -m mnemosyne.cli`` runs ``mnemo``."""

import sys

from mnemosyne.cli.main import main

sys.exit(main())
