"""Shared fixtures: things built once and used by several test files (a saved model, a trained
workdir, a fake gs:// bucket). The builders they use live in ``_train_helpers.py`` (tiny configs,
params, batches) and ``_makers.py`` (images, data files, subprocess runners), so that the scripts
run as ``python tests/_x.py`` import the same single definition."""

import os

import pytest

# libtpu (the [tpu-compile] extra in [test]) would otherwise be probed, and complain on stderr, in every
# jax process of the suite (subprocesses inherit it); compile-only targets open their TPU topology all the same.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def save_hf_model():
    """``save_hf_model(cfg, path, seed=0)``: a random-init transformers ChineseCLIPModel of ``cfg``
    (weights drawn after ``torch.manual_seed(seed)``), saved in the HF layout at ``path``; returns
    the model in eval mode, the reference the tests compare against."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def save(cfg, path, seed=0):
        torch.manual_seed(seed)
        model = transformers.ChineseCLIPModel(transformers.ChineseCLIPConfig.from_dict(cfg.to_dict())).eval()
        model.save_pretrained(path)
        return model

    return save


@pytest.fixture(scope="session")
def small_hf_dir(tmp_path_factory, save_hf_model):
    """A random transformers ChineseCLIPModel of ``SMALL_SIZES`` (seed 0) saved in the HF layout;
    its path. Shared by the suite: tests copy it before changing anything."""
    from _train_helpers import SMALL_SIZES, tiny_config

    path = tmp_path_factory.mktemp("small_hf")
    save_hf_model(tiny_config(**SMALL_SIZES), path)
    return path


@pytest.fixture
def fake_gcs():
    """gs:// served by an in-memory fsspec filesystem (epath's fsspec backend, as with gcsfs)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol, root_marker = ("gs", "gcs"), ""
        store, pseudo_dirs = {}, [""]

        @classmethod
        def _strip_protocol(cls, path):  # "gs://bucket/x" -> "bucket/x", as gcsfs
            path = str(path).split("://", 1)[-1]
            return path.strip("/")

    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGCS
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    import importlib

    registry = importlib.import_module("fsspec.registry")
    for name in ("gs", "gcs"):
        registry._registry.pop(name, None)
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A workdir of ``train()`` run 8 steps on ``tiny_train_config(8, export_hf=True)`` and the demo
    data: checkpoints 4 and 8, metrics.jsonl, the HF export in ``hf/``. One run shared by the suite:
    tests read it or copy it (``shutil.copytree``), never change it."""
    import os

    from _train_run import make_iterator, tiny_train_config

    from chinese_clip_jax.training.loop import train

    workdir = str(tmp_path_factory.mktemp("trained"))
    config = tiny_train_config(8, export_hf=True)
    result = train(config, workdir, data_iter=make_iterator(config), progress=False)
    assert result["step"] == 8 and result["export_dir"] == os.path.join(workdir, "hf")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    return workdir
