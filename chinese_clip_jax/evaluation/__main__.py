"""``python -m chinese_clip_jax.evaluation``: the ``ccj-eval`` command line."""

import sys

from .cli import main

sys.exit(main())
