"""Tokenizers that work offline: byte-level ByT5 (needs no file) or a saved tokenizer folder
(local or s3://, e.g. a real T5 `spiece.model` folder). Saved beside every checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clippy_ray import _compat, storage
from clippy_ray.config import TextConfig
from clippy_ray.errors import InputError


class Tokenizer:
    """Captions -> fixed-length int64 `input_ids` and `attention_mask` arrays [N, max_length]."""

    def __init__(self, hf_tokenizer, max_length: int):
        self.hf = hf_tokenizer
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        if len(texts) == 0:  # Ray Data can hand a map function an empty block
            empty = np.zeros((0, self.max_length), np.int64)
            return {"input_ids": empty, "attention_mask": empty.copy()}
        out = self.hf(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {
            "input_ids": out["input_ids"].astype(np.int64),
            "attention_mask": out["attention_mask"].astype(np.int64),
        }

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))


def build_tokenizer(cfg: TextConfig) -> Tokenizer:
    _compat.patch_torchvision_ops()
    if cfg.tokenizer == "byte":
        from transformers import ByT5Tokenizer

        return Tokenizer(ByT5Tokenizer(), cfg.max_length)
    from transformers import AutoTokenizer, T5Tokenizer

    folder = storage.fetch(cfg.tokenizer)
    described = any((folder / f).exists() for f in ("tokenizer_config.json", "tokenizer.json", "config.json"))
    # A bare T5 `spiece.model` folder says nothing about its class: it is T5's SentencePiece.
    loader = AutoTokenizer if described or not (folder / "spiece.model").exists() else T5Tokenizer
    try:
        extra = {"trust_remote_code": False} if loader is AutoTokenizer else {}  # never a folder's own code
        hf = loader.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError) as err:
        raise InputError(
            f"model.text.tokenizer={cfg.tokenizer!r}: not a tokenizer folder ({err}); "
            "use 'byte' or a folder with tokenizer.json or spiece.model"
        ) from None
    return Tokenizer(hf, cfg.max_length)
