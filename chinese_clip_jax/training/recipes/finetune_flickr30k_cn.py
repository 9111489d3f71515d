"""Fine-tuning on flickr30k_cn as the paper / cn_clip's run_scripts do it (see finetune_recipes.py).

    python -m chinese_clip_jax.data.build DATA/flickr30k_cn build/flickr30k_cn-tfds --format cn_clip --split train
    python -m chinese_clip_jax.data.build DATA/flickr30k_cn build/flickr30k_cn-tfds --format cn_clip --split valid
    python -m train --config train/configs/finetune_flickr30k_cn.py --workdir build/ft-flickr30k_cn \\
        --config.init_from=CHECKPOINT --config.data.tfds.builder_dir=build/flickr30k_cn-tfds
"""

from chinese_clip_jax.training.recipes.finetune_recipes import recipe


def get_config():
    return recipe("flickr30k_cn")
