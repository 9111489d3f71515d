"""``python -m convert SRC OUT ...``: the command line of ``chinese_clip_jax.conversion.cli``
(also installed as ``ccj-convert``)."""

import sys

from chinese_clip_jax.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
