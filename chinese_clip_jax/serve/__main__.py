"""``python -m chinese_clip_jax.serve`` = ``ccj-serve``."""

import sys

from .cli import main

sys.exit(main())
