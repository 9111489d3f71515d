"""Every key the trainer reads, with defaults; other configs start from ``get_config()`` here.

Override any key on the command line: ``--config.optimizer.lr=1e-5 --config.mesh.fsdp=4``.
"""

import ml_collections
from ml_collections.config_dict import FieldReference

from chinese_clip_jax.data import default_data_config
from chinese_clip_jax.processing import DEFAULT_CONTEXT_LENGTH


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    # > 0: train this many passes over the train split instead; total_steps becomes
    # ceil(epochs x train records / batch_size), computed once the data is opened and recorded in
    # DIR/run_length.json for resumes (chinese_clip_jax/training/run_length.py). 0 = total_steps.
    c.epochs = 0.0
    c.batch_size = 256  # GLOBAL batch (all processes, all micro-batches)
    # micro-batches per step; the gradient is still the full-batch one (GradCache). "auto": the fewest
    # that fit the devices' memory, found by compiling the step before the run (training/compile.py
    # fewest_accum_steps; 1 on CPU), printed and kept in DIR/run_options.json for resumes.
    c.accum_steps = FieldReference(1, field_type=object)
    c.loss = "softmax"  # "softmax" (CLIP InfoNCE) | "sigmoid" (SigLIP, learnable bias)
    # How the loss is computed (same value and gradients): "gather" (each device's local_B x global_B
    # logits of the all-gathered batch) | "ring" (image rows passed round the batch devices, logits
    # held one local_B x loss_chunk slice at a time: memory flat in the global batch). docs/performance.md.
    c.loss_impl = "gather"
    c.loss_chunk = 0  # ring only: column slice of a ring block, dividing batch_size / (data x fsdp); 0 = all of it
    # Which pairs of a batch are positives of each other: "pair" (pair i only: CLIP) | "caption"
    # (pairs whose captions are identical) | "label" (pairs with the same source label: a files
    # table's label column, cn_clip's text_id, the demo's class). docs/training.md.
    c.loss_positives = "pair"
    # compute dtype: "auto" (float32 on CPU, bfloat16 on GPU/TPU) | "float32" | "bfloat16"; params and loss stay fp32
    c.dtype = "auto"
    c.freeze = ""  # "" | "image" (paper's stage 1, LiT) | "text"
    # Partial unfreezing: N >= 0 trains only the last N transformer layers of that tower (and its
    # final LayerNorm and projection), the rest of it frozen; -1 = off. Needs model.scan_layers=False.
    c.unfreeze_last_layers = ml_collections.ConfigDict({"text": -1, "image": -1})
    # LoRA (parameter-efficient fine-tuning, docs/training.md): rank > 0 adds low-rank adapters
    # (delta = alpha / rank * A @ B) on the projections of `targets` ("attention": query, key,
    # value, out; "mlp": fc1, fc2) in `towers` ("text", "image"), and freezes the whole base
    # (logit_scale too); only the adapters (and unfreeze_last_layers' layers) carry optimizer
    # state. Checkpoints hold the adapters; export_hf writes merged weights. 0 = off.
    c.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "targets": "attention,mlp", "towers": "text,image"})
    c.init_from = ""  # anything ccj.from_pretrained reads (HF dir, cn_clip .pt, converted dir)
    c.require_init_from = False  # True in fine-tuning configs: refuse to start without init_from
    c.context_length = DEFAULT_CONTEXT_LENGTH
    # Dropout's random-bit generator: "auto" | "threefry" | "rbg" | "unsafe_rbg"; resume is exact
    # with each. "auto": the platform's (chinese_clip_jax/training/defaults.py: threefry on CPU, rbg
    # on GPU/TPU; docs/accelerators.md). Every "auto" is printed at start-up and written to
    # DIR/run_options.json.
    c.rng_impl = "auto"
    c.xla_gpu_flags = "none"  # a set of chinese_clip_jax.training.xla_flags.GPU_FLAG_SETS: "none" | "tuned"

    c.log_every = 10
    c.eval_every = 0  # 0 = no evaluation; -1 = once per epoch (with epochs)
    c.checkpoint_every = 500  # -1 = once per epoch (with epochs)
    c.keep_checkpoints = 3
    c.export_hf = False  # at the end, also write DIR/hf (config.json + model.safetensors, ccj.save_pretrained)

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1 fills

    c.optimizer = ml_collections.ConfigDict(
        {
            "lr": 5e-4,
            "warmup_steps": 100,
            "weight_decay": 0.2,
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-6,
            "grad_clip": 0.0,  # global-norm clip over trainable params; 0 = off
            "end_lr_factor": 0.0,
        }
    )

    # Architecture: model.preset (e.g. "chinese-clip-vit-base-patch16") or the sizes below.
    # Ignored when init_from is set (the checkpoint's config.json decides).
    c.model = ml_collections.ConfigDict(
        {
            "preset": "",
            # Resolution to train at; 0 = the checkpoint's (init_from) or model.vision.image_size. With
            # init_from, a ViT's position embeddings are resized once (cn_clip's resize_pos_embed).
            "image_size": 0,
            "projection_dim": 512,
            "text": {
                "vocab_size": 21128,
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "max_position_embeddings": 512,
            },
            "vision": {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "image_size": 224,
                "patch_size": 16,
            },
            # "auto" below: the platform's choice (chinese_clip_jax/training/defaults.py). CPU: head-major
            # XLA attention, scanned layers, remat "dots" (the lowest memory at no loss of speed);
            # GPU: cuDNN attention, unrolled layers, no remat; TPU: XLA attention, scanned, "dots".
            # Untyped fields (a recipe may assign True / False / None as well as a string):
            "attention_impl": FieldReference("auto", field_type=object),  # "auto" ("") | "xla" | "cudnn" | "splash"
            "scan_layers": FieldReference("auto", field_type=object),  # "auto" | True | False
            "remat": FieldReference("auto", field_type=object),  # "auto" | "dots" | "full" (whole layers) | "none"
        }
    )

    c.data = default_data_config("demo")

    # Multi-host (jax.distributed.initialize); also from the usual cluster environment.
    c.distributed = ml_collections.ConfigDict({"coordinator_address": "", "num_processes": 0, "process_id": -1})
    return c
