"""``python -m chinese_clip_jax.embed`` = ``ccj-embed``."""

import sys

from .cli import main

sys.exit(main())
