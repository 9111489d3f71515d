"""``python -m train --config F --workdir DIR``: the command line of ``chinese_clip_jax.training.cli``
(also installed as ``ccj-train``)."""

from chinese_clip_jax.training.cli import run

if __name__ == "__main__":
    run()
