"""``python -m train --config train/configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]``."""
