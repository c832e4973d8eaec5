"""``python -m backdoor_train`` is the ``backdoor-train`` command."""

import sys

from backdoor_train.cli import main

sys.exit(main())
