"""Text and image preprocessing, identical to transformers' ChineseCLIPProcessor.

Text goes through transformers' BERT tokenizer (the real 21128-token Chinese vocab ships in
`chinese_clip_jax/assets/vocab.txt`); images go through ``image_processing.ImagePreprocessor``
(PIL decode and resize, numpy normalisation, step for step as `ChineseCLIPImageProcessor`), with
the settings of ``image_settings.ImageSettings``.

No torch is needed. Outputs: `input_ids`, `attention_mask`, `token_type_ids` (int32, (N, L),
L = 52 by default) and `pixel_values` (float32, NCHW).
"""

from __future__ import annotations

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


def _load_tokenizer(directory):
    from transformers import AutoTokenizer, BertTokenizer

    directory = Path(directory)
    if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(directory))
    # A bare vocab.txt: BertTokenizer(vocab_file=...) would silently build a 5-token vocab in
    # transformers 5, from_pretrained(dir) reads the file.
    return BertTokenizer.from_pretrained(str(directory))


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
        resize_mode: str = "processor",
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
        preprocessor_config.json); a missing file falls back, with a warning, to the bundled vocab
        or to transformers' default image settings. kwargs go to __init__.
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
                logger.warning(
                    "no processor_config.json or preprocessor_config.json in %s: using transformers' defaults",
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

        With no ``padding``: padded and truncated to context_length (52 unless given) with
        [CLS] ... [SEP], as transformers with ``padding="max_length", max_length=52,
        truncation=True``. An explicit ``padding`` (True / "longest", "max_length", False /
        "do_not_pad") means transformers' own semantics: ``truncation`` defaults to False,
        ``context_length`` is the ``max_length`` (unset: the context length for "max_length",
        else the tokenizer's ``model_max_length``). Rows of different lengths come back as lists.
        """
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
        if padding is None:  # the fixed-length default
            padding, truncation = "max_length", True if truncation is None else truncation
        if truncation is None:  # transformers' default once padding is explicit
            truncation = False
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation not in (True, False, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation must be True, False or 'longest_first', got {truncation!r}")
        # max_length defaults to the context length only for fixed-length padding; otherwise, as in
        # transformers, truncation stops at the tokenizer's model_max_length.
        length = self.context_length if context_length is None and padding == "max_length" else context_length
        if not texts:
            z = np.zeros((0, length or 0), np.int32)
            return {"input_ids": z, "attention_mask": z.copy(), "token_type_ids": z.copy()}
        enc = self.tokenizer(
            texts,
            padding=padding,
            max_length=None if length is None else int(length),
            truncation=truncation,
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        keys = ("input_ids", "attention_mask", "token_type_ids")
        if len({len(row) for row in enc["input_ids"]}) > 1:
            return {k: [list(row) for row in enc[k]] for k in keys}
        return {k: np.asarray(enc[k], np.int32) for k in keys}

    def preprocess_images(self, images, start_index: int = 0) -> np.ndarray:
        """images (PIL / uint8 array / path, or a list) -> pixel_values (N, 3, H, W) float32.

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

        padding / truncation / max_length: as transformers' (see ``tokenize``); without padding,
        a fixed length of 52 (or max_length) with truncation, so jitted shapes stay fixed.
        return_tensors: "np" (and None), "jax", or "pt" (torch tensors, int64 ids as
        transformers; needs torch).
        """
        if text is None and images is None:
            raise ValueError("give text, images or both")
        if return_tensors not in (None, "np", "jax", "pt"):
            raise ValueError(f"return_tensors must be 'np', 'jax' or 'pt', got {return_tensors!r}")
        out: dict[str, Any] = {}
        if text is not None:
            out.update(self.tokenize(text, max_length, padding=padding, truncation=truncation))
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
