"""``python -m clip_eval``: the same as the ``clip-eval`` console script."""

import sys

from clip_eval.cli import main

sys.exit(main())
