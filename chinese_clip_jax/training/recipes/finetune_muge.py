"""Fine-tuning on muge as the paper / cn_clip's run_scripts do it (see finetune_recipes.py).

    python -m chinese_clip_jax.data.build DATA/muge build/muge-tfds --format cn_clip --split train
    python -m chinese_clip_jax.data.build DATA/muge build/muge-tfds --format cn_clip --split valid
    python -m train --config train/configs/finetune_muge.py --workdir build/ft-muge \\
        --config.init_from=CHECKPOINT --config.data.tfds.builder_dir=build/muge-tfds
"""

from chinese_clip_jax.training.recipes.finetune_recipes import recipe


def get_config():
    return recipe("muge")
