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
