"""Text and image preprocessing, identical to transformers' ChineseCLIPProcessor.

Text goes through transformers' BERT tokenizer (the real 21128-token Chinese vocab ships in
`chinese_clip_jax/assets/vocab.txt`); images go through ``image_processing.ImagePreprocessor``
(PIL decode and resize, numpy normalisation, step for step as `ChineseCLIPImageProcessor`), with
the settings of ``image_settings.ImageSettings``.

No torch is needed, and none is imported: the tokenizer is transformers' ``BertTokenizer``,
built without ``AutoTokenizer`` (whose import loads torch) unless a checkpoint names another
tokenizer class. The image path (``ImagePreprocessor``, ``ImageSettings``, ``normalize_pixels``)
needs numpy and PIL only, so grain / tf.data workers can import it cheaply. Outputs:
`input_ids`, `attention_mask`, `token_type_ids` (int32, (N, L), L = 52 by default) and
`pixel_values` (float32, NCHW).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .image import ImagePreprocessor
from .image_settings import ImageSettings, read_image_settings

__all__ = ["ChineseCLIPProcessor", "DEFAULT_CONTEXT_LENGTH", "ASSETS_DIR"]

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 52
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_BERT_CLASSES = (None, "BertTokenizer", "BertTokenizerFast")


def _load_tokenizer(directory):
    """The directory's tokenizer: ``BertTokenizer`` (Chinese-CLIP's) unless its tokenizer_config.json
    names another class, which then goes through ``AutoTokenizer`` (that import loads torch)."""
    from transformers import BertTokenizer

    directory = Path(directory)
    config = directory / "tokenizer_config.json"
    tokenizer_class = None
    if config.exists():
        try:
            tokenizer_class = json.loads(config.read_text(encoding="utf-8-sig")).get("tokenizer_class")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{config} is not a valid JSON object: {e}") from None
    if tokenizer_class not in _BERT_CLASSES:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    # A bare vocab.txt: BertTokenizer(vocab_file=...) would silently build a 5-token vocab in
    # transformers 5, from_pretrained(dir) reads the file (and tokenizer.json / the config if there).
    return BertTokenizer.from_pretrained(str(directory))


def _resolution_from_config(directory: Path) -> int | None:
    """vision_config.image_size of the directory's config.json (the model's input size), if any."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    r = d.get("vision_config", {}).get("image_size") if isinstance(d, dict) else None
    if r is None:
        return None
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{path}: vision_config.image_size must be an int >= 1, got {r!r}")
    return r


class ChineseCLIPProcessor:
    """Tokenizer + image preprocessor, outputs identical to transformers' ChineseCLIPProcessor.

    ChineseCLIPProcessor() works offline (bundled vocab, transformers' default image settings);
    ChineseCLIPProcessor.from_pretrained(dir_or_hub_id) uses the checkpoint's own files.
    """

    def __init__(
        self,
        tokenizer=None,
        image_settings: ImageSettings | dict | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        resize_mode: str = "center",
        num_threads: int | None = None,
    ):
        if isinstance(image_settings, dict):
            image_settings = ImageSettings.from_dict(image_settings)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(ASSETS_DIR)
        self.context_length = int(context_length)
        self.image_processor = ImagePreprocessor(image_settings, resize_mode, num_threads)

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, **kwargs) -> ChineseCLIPProcessor:
        """src: a checkpoint directory or a hub id (downloaded when online).

        Reads the tokenizer files (tokenizer_config.json / tokenizer.json / vocab.txt) and the
        image settings (processor_config.json as transformers 5 writes it, or
        preprocessor_config.json). Without tokenizer files: the bundled vocab (with a warning).
        Without image settings: transformers' defaults at the resolution of the model's
        config.json (``vision_config.image_size``, as ``ChineseCLIP.from_pretrained`` on the same
        folder uses), else at 224 px (with a warning). kwargs go to __init__.
        """
        from ..io import resolve_local_or_hub

        directory = Path(resolve_local_or_hub(src, allow_patterns=["*.json", "*.txt"]))
        if not directory.is_dir():
            raise NotADirectoryError(f"{src} is not a directory: a processor is read from a checkpoint directory")
        if any((directory / f).exists() for f in _TOKENIZER_FILES):
            tokenizer = _load_tokenizer(directory)
        else:
            logger.warning("no tokenizer files in %s: using the bundled Chinese-CLIP vocab", directory)
            tokenizer = None
        if "image_settings" not in kwargs:
            kwargs["image_settings"] = read_image_settings(directory)
            if kwargs["image_settings"] is None:
                r = _resolution_from_config(directory)
                if r is not None:
                    kwargs["image_settings"] = ImageSettings.at_resolution(r)
                else:
                    logger.warning(
                        "no processor_config.json, preprocessor_config.json or config.json in %s: "
                        "using transformers' default image settings (224 px)",
                        directory,
                    )
        return cls(tokenizer=tokenizer, **kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of pixel_values."""
        return self.image_processor.image_size

    def tokenize(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        *,
        padding: bool | str | None = None,
        truncation: bool | str | None = None,
    ) -> dict[str, np.ndarray | list]:
        """texts -> {"input_ids", "attention_mask", "token_type_ids"}, int32 (N, L).

        With neither ``padding`` nor ``truncation``: padded and truncated to context_length (52
        unless given) with [CLS] ... [SEP], as transformers with ``padding="max_length",
        max_length=52, truncation=True``. With either: transformers' own semantics, with
        ``context_length`` as its ``max_length`` (None: the tokenizer's ``model_max_length``).
        Rows of different lengths come back as lists.
        """
        if padding is None and truncation is None:  # the fixed-length default
            length = self.context_length if context_length is None else int(context_length)
            return self._encode(texts, padding="max_length", truncation=True, max_length=length)
        return self._encode(texts, padding=padding, truncation=truncation, max_length=context_length)

    def _encode(self, texts, **kwargs) -> dict[str, np.ndarray | list]:
        """The tokenizer's own call with the given padding / truncation / max_length (None: not
        passed, so transformers' defaults apply)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        bad = [i for i, t in enumerate(texts) if not _is_encodable(t)]
        if bad:
            raise ValueError(
                f"text {bad[0]} ({texts[bad[0]]!r}) is not valid Unicode (a lone surrogate); "
                "texts must be encodable as UTF-8"
            )
        padding, truncation = kwargs.get("padding"), kwargs.get("truncation")
        if padding not in (None, True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation not in (None, True, False, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation must be True, False or 'longest_first', got {truncation!r}")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if "max_length" in kwargs:
            kwargs["max_length"] = int(kwargs["max_length"])
        if not texts:
            z = np.zeros((0, kwargs.get("max_length", 0) if padding == "max_length" else 0), np.int32)
            return {"input_ids": z, "attention_mask": z.copy(), "token_type_ids": z.copy()}
        enc = self.tokenizer(texts, return_token_type_ids=True, return_attention_mask=True, **kwargs)
        keys = ("input_ids", "attention_mask", "token_type_ids")
        if len({len(row) for row in enc["input_ids"]}) > 1:
            return {k: [list(row) for row in enc[k]] for k in keys}
        return {k: np.asarray(enc[k], np.int32) for k in keys}

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        """Token id rows -> texts: the tokenizer's ``batch_decode`` (numpy / jax arrays accepted),
        as transformers' processor forwards it."""
        return self.tokenizer.batch_decode(_as_id_lists(sequences), **kwargs)

    def decode(self, token_ids, **kwargs) -> str:
        """One row of token ids -> text: the tokenizer's ``decode``."""
        return self.tokenizer.decode(_as_id_lists(token_ids), **kwargs)

    def preprocess_images(self, images, start_index: int = 0) -> np.ndarray:
        """images (PIL / uint8 array or torch tensor / path, or a list) -> pixel_values (N, 3, H, W) float32.

        start_index: position of the first image in the caller's list, for error messages.
        """
        return self.image_processor(images, start_index)

    def __call__(
        self,
        text=None,
        images=None,
        return_tensors: str | None = "np",
        max_length: int | None = None,
        padding: bool | str | None = None,
        truncation: bool | str | None = None,
    ) -> dict[str, Any]:
        """Either or both of text and images -> dict of arrays, as transformers' processor.

        With none of padding / truncation / max_length: a fixed length of 52 (the context length)
        with truncation, so jitted shapes stay fixed. With any of them: exactly transformers'
        semantics (e.g. ``padding="max_length"`` alone pads to the tokenizer's
        ``model_max_length``; ``truncation=True, max_length=8`` truncates without padding).
        return_tensors: "np" (and None), "jax", or "pt" (torch tensors, int64 ids as
        transformers; needs torch).
        """
        if text is None and images is None:
            raise ValueError("give text, images or both")
        if return_tensors not in (None, "np", "jax", "pt"):
            raise ValueError(f"return_tensors must be 'np', 'jax' or 'pt', got {return_tensors!r}")
        out: dict[str, Any] = {}
        if text is not None:
            if padding is None and truncation is None and max_length is None:
                out.update(self.tokenize(text))
            else:
                out.update(self._encode(text, padding=padding, truncation=truncation, max_length=max_length))
            if return_tensors is not None and isinstance(out["input_ids"], list):
                raise ValueError(
                    f"padding={padding!r} left rows of different lengths, which return_tensors="
                    f"{return_tensors!r} cannot stack; pad (padding=True) or pass return_tensors=None"
                )
        if images is not None:
            out["pixel_values"] = self.preprocess_images(images)
        if return_tensors == "jax":
            import jax.numpy as jnp

            out = {k: jnp.asarray(v) for k, v in out.items()}
        elif return_tensors == "pt":
            try:
                import torch
            except ImportError:
                raise ImportError("return_tensors='pt' needs torch (pip install 'chinese-clip-jax[torch]')") from None
            out = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for k, v in out.items()}
        return out


def _as_id_lists(ids):
    """numpy / jax / torch arrays of token ids -> (nested) Python ints; lists pass through."""
    if hasattr(ids, "tolist") and not isinstance(ids, list):
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [_as_id_lists(x) if hasattr(x, "tolist") else x for x in ids]
    return ids
