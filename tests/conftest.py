"""Shared fixtures. The builders they use (tiny configs, params, batches) live in ``_train_helpers.py``
so that the scripts run as ``python tests/_x.py`` import the same single definition."""

import pytest


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
    import importlib

    registry = importlib.import_module("fsspec.registry")
    for name in ("gs", "gcs"):
        registry._registry.pop(name, None)
    backend.fsspec_backend._get_filesystem.cache_clear()
