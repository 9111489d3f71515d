"""Run with 8 simulated CPU devices (set by the caller): prints ``RESULT {json}`` describing where
``sharded_init`` and ``shard_batch`` put things on a (data, fsdp, tensor) = (2, 2, 2) mesh.

Every figure is read back from the arrays' own shards (device -> index and data), so the test that
reads it checks placement, not the code's own claims about it.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from _train_helpers import tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax import sharding as shd

assert jax.device_count() == 8, jax.devices()
mesh = shd.make_mesh(2, 2, 2)
coords = {d.id: tuple(int(c) for c in np.argwhere(mesh.devices == d)[0]) for d in mesh.devices.flat}

# A host batch of 8 rows: rows are numbered so each shard says which rows it holds.
host = {"x": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
batch = shd.shard_batch(host, mesh)["x"]
rows = {}
for shard in batch.addressable_shards:
    data = np.asarray(shard.data)
    rows[str(coords[shard.device.id])] = [int(r) for r in data[:, 0] // 3]

model = ccj.ChineseCLIPModel(tiny_config(vocab_size=64))
params, _ = shd.sharded_init(model, mesh, jax.random.key(0), jnp.ones((2, 8), jnp.int32), jnp.zeros((2, 3, 8, 8)))
flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def shard_shapes(key):
    x = flat[key]
    return {
        "global": list(x.shape),
        "shape": {str(coords[s.device.id]): list(s.data.shape) for s in x.addressable_shards},
        "start": {str(coords[s.device.id]): [sl.start or 0 for sl in s.index] for s in x.addressable_shards},
    }


picked = {}
for name, needle in {
    "word_embeddings": "['word_embeddings']['embedding']",
    "mlp_in": "['mlp']['fc1']['kernel']",
    "query": "['query']['kernel']",
    "layer_norm": "['mlp_norm']['scale']",
}.items():
    key = next(k for k in sorted(flat) if needle in k and "text_model" in k)
    picked[name] = shard_shapes(key)
print("RESULT " + json.dumps({"batch_rows": rows, "params": picked}))
