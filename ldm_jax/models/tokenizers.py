"""Tokenizers for text conditioning. They run on the host (plain Python/NumPy), before ``jit``.

* :class:`ByteTokenizer` needs no files: UTF-8 bytes plus PAD/BOS/EOS ids. It pairs with the
  from-scratch :class:`ldm_jax.models.conditioning.TextTransformer`.
* :class:`CLIPTokenizer` is CLIP's byte-level BPE, read from a local ``vocab.json`` +
  ``merges.txt`` (or a transformers ``tokenizer/`` folder). It reproduces transformers'
  ``CLIPTokenizer``: NFC normalisation, whitespace collapsing, lowercasing, CLIP's
  pre-tokenisation regex, ``</w>`` end-of-word marks, BOS/EOS, padding and truncation.

Both return a :class:`TokenizedText` of int32 ``ids`` [B, L] and a boolean ``mask`` [B, L]
(True at real tokens, including BOS/EOS).
"""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import regex


class TokenizedText(NamedTuple):
    """ids: int32 [B, L]; mask: bool [B, L], True at real (non-padding) tokens."""

    ids: np.ndarray
    mask: np.ndarray


def _as_batch(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"expected a string or a sequence of strings, got element {t!r}")
    return texts


def _pack(rows: list[list[int]], max_length: int, pad_id: int) -> TokenizedText:
    ids = np.full((len(rows), max_length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), max_length), dtype=bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return TokenizedText(ids, mask)


# --------------------------------------------------------------------------------------------
# Byte tokenizer


class ByteTokenizer:
    """UTF-8 byte tokenizer: ``PAD=0, BOS=1, EOS=2``, byte ``b`` -> ``b + 3``; vocab size 259.

    Every string is encoded as ``[BOS, bytes..., EOS]`` padded with PAD to ``max_length``.
    Longer strings are truncated to ``max_length - 2`` bytes at a character boundary (never
    inside a multi-byte character) and still end with EOS. The empty string gives
    ``[BOS, EOS]``, the unconditional input used for classifier-free guidance.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    byte_offset = 3
    vocab_size = 259

    def __init__(self, max_length: int = 77):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        """One string -> ids with BOS/EOS, truncated but not padded."""
        data = text.encode("utf-8")
        budget = self.max_length - 2
        if len(data) > budget:
            cut = budget
            # UTF-8 continuation bytes are 0b10xxxxxx; back up to the start of a character.
            while cut > 0 and (data[cut] & 0xC0) == 0x80:
                cut -= 1
            data = data[:cut]
        return [self.bos_id, *(b + self.byte_offset for b in data), self.eos_id]

    def __call__(self, texts: str | Sequence[str]) -> TokenizedText:
        """Strings -> ``TokenizedText`` with ids int32 [B, max_length] and mask bool [B, max_length]."""
        return _pack([self.encode(t) for t in _as_batch(texts)], self.max_length, self.pad_id)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> string; special ids are dropped, decoding stops at the first EOS."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= self.byte_offset:
                out.append(i - self.byte_offset)
        return out.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# CLIP byte-level BPE


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (control chars, space, ...) are shifted
    to code points 256+ so that BPE never sees whitespace or control characters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


# Special tokens first so that they survive as single pieces; contractions; letter runs; single
# digits; runs of other non-space characters (CLIP's pattern).
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# transformers/tokenizers then applies its ByteLevel pre-tokenizer, which splits each piece again
# with GPT-2's pattern. That only changes the special-token alternative above: a lowercased
# "<|endoftext|>" that was not matched as a special token becomes "<|", "endoftext", "|>".
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_WHITESPACE = regex.compile(r"\s+")
END_OF_WORD = "</w>"


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a ``merges.txt``: one ``left right`` pair a line, optional ``#version`` header."""
    merges = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.rstrip("\n")
            if n == 0 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"bad merge line {n + 1} in {os.fspath(path)}: {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _token_content(value) -> str | None:
    """A special token from a tokenizer config: a plain string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}")


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (matches transformers' ``CLIPTokenizer`` ids).

    Args:
      vocab: token -> id (``vocab.json``); must hold every byte character and its ``</w>`` form.
      merges: BPE merges in priority order (``merges.txt``).
      bos_token, eos_token, pad_token, unk_token: special tokens; SD 1.x pads with
        ``"<|endoftext|>"`` (= EOS), SD 2.x with ``"!"`` (id 0).
      max_length: padded/truncated length (77 for every Stable Diffusion text encoder).
      normalized_special_tokens: special tokens that are also recognised after normalisation
        (so "<|EndOfText|>" counts as EOS); the others only match the raw text. This mirrors
        the ``normalized`` flag of transformers' added tokens; ``from_pretrained`` reads it.

    Special tokens in the text are cut out before BPE, as transformers does with added
    tokens: with SD 2.x's pad token "!" every "!" in a prompt becomes id 0 (not "!</w>") and
    splits the words around it, exactly like the reference pipeline.

    Calling the tokenizer on strings gives ``[BOS, tokens..., EOS, PAD...]`` of ``max_length``;
    longer texts keep their first ``max_length - 2`` tokens and still end with EOS.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        max_length: int = 77,
        normalized_special_tokens: Iterable[str] = (),
    ):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        for token in (bos_token, eos_token, pad_token, unk_token):
            if token not in self.encoder:
                raise ValueError(f"special token {token!r} is not in the vocabulary")
        self.bpe_ranks = {tuple(m): r for r, m in enumerate(merges)}
        for m in merges:
            if len(m) != 2 or "".join(m) not in self.encoder:
                raise ValueError(f"merge {m!r} produces {''.join(m)!r}, which is not in the vocabulary")
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_id = self.encoder[bos_token]
        self.eos_id = self.encoder[eos_token]
        self.pad_id = self.encoder[pad_token]
        self.unk_id = self.encoder[unk_token]
        self.max_length = max_length
        self._special = {t: self.encoder[t] for t in (bos_token, eos_token, pad_token, unk_token)}
        self.normalized_special_tokens = frozenset(normalized_special_tokens)
        unknown = self.normalized_special_tokens - set(self._special)
        if unknown:
            raise ValueError(f"normalized_special_tokens {sorted(unknown)!r} are not special tokens")
        self._raw_pattern = self._split_pattern(self._special)
        self._normalized_pattern = self._split_pattern(self.normalized_special_tokens)
        self._cache: dict[str, tuple[str, ...]] = {}

    @staticmethod
    def _split_pattern(tokens):
        """A regex whose ``split`` keeps the given tokens as separate items (longest first)."""
        if not tokens:
            return None
        return regex.compile("(" + "|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, **kwargs) -> "CLIPTokenizer":
        """Build from a ``vocab.json`` and a ``merges.txt``; ``kwargs`` as in the constructor."""
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        return cls(vocab, read_merges(merges_file), **kwargs)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, subfolder: str | None = None, **overrides
    ) -> "CLIPTokenizer":
        """Load a transformers tokenizer folder (``vocab.json``, ``merges.txt`` and, when present,
        ``tokenizer_config.json`` / ``special_tokens_map.json`` for special tokens and
        ``model_max_length``). A diffusers pipeline folder works too (its ``tokenizer/``
        subfolder is used, or ``subfolder``: SDXL's second tokenizer is ``subfolder="tokenizer_2"``,
        which pads with "!" (id 0) where the first pads with EOS). ``overrides`` win over the
        files. Added tokens other than BOS/EOS/PAD/UNK (``added_tokens.json``, extra special
        tokens) are not supported.
        """
        folder = os.fspath(folder)
        if subfolder is not None:
            folder = os.path.join(folder, subfolder)
        elif not os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(
            os.path.join(folder, "tokenizer", "vocab.json")
        ):
            folder = os.path.join(folder, "tokenizer")
        vocab_file = os.path.join(folder, "vocab.json")
        merges_file = os.path.join(folder, "merges.txt")
        for path in (vocab_file, merges_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file not found: {path}")
        configs = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    configs[name] = json.load(f)
        kwargs: dict = {}
        entries: dict = {}  # special_tokens_map.json overrides tokenizer_config.json key by key
        for config in configs.values():
            for key in _SPECIAL_KEYS:
                if config.get(key) is not None:
                    entries[key] = config[key]
            max_len = config.get("model_max_length")
            # transformers writes a huge sentinel when no limit is set.
            if isinstance(max_len, int) and 2 <= max_len <= 100_000:
                kwargs["max_length"] = max_len
        for key, value in entries.items():
            kwargs[key] = _token_content(value)
        kwargs.update(overrides)
        if "normalized_special_tokens" not in overrides:
            flags = cls._normalized_flags(entries, configs.get("tokenizer_config.json", {}))
            defaults = ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
            specials = {kwargs.get(k, d) for k, d in zip(_SPECIAL_KEYS, defaults)}
            kwargs["normalized_special_tokens"] = flags & specials
        return cls.from_files(vocab_file, merges_file, **kwargs)

    @staticmethod
    def _normalized_flags(entries: Mapping, tokenizer_config: Mapping) -> frozenset:
        """Which special tokens transformers also matches after normalisation.

        ``added_tokens_decoder`` in ``tokenizer_config.json`` is authoritative when present.
        Otherwise a token is normalised-matched only when every special-token entry naming it
        is an AddedToken dict with ``normalized: true`` (a plain string means raw-only). This
        reproduces transformers on the Stable Diffusion 1.x/2.x tokenizer folders; exotic
        configurations may differ, and only for specials written in a different case.
        """
        decoder = tokenizer_config.get("added_tokens_decoder")
        if isinstance(decoder, Mapping) and decoder:
            return frozenset(
                t["content"] for t in decoder.values() if isinstance(t, Mapping) and t.get("normalized", False)
            )
        flags: dict[str, bool] = {}
        for value in entries.values():
            content = _token_content(value)
            normalized = isinstance(value, Mapping) and bool(value.get("normalized", False))
            flags[content] = flags.get(content, True) and normalized
        return frozenset(t for t, flag in flags.items() if flag)

    # -- encoding ------------------------------------------------------------------------

    @staticmethod
    def normalize(text: str) -> str:
        """NFC, collapse whitespace runs to one space, strip, lowercase (as transformers does).

        Lowercasing is per character, as in the transformers/tokenizers pipeline: a word-final
        capital sigma becomes "σ", not the "ς" that context-aware ``str.lower`` would give.
        """
        text = unicodedata.normalize("NFC", text)
        text = _WHITESPACE.sub(" ", text).strip()
        return "".join(ch.lower() for ch in text)

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """One pre-token (already mapped to byte characters) -> BPE symbols; the last carries ``</w>``."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        while len(word) > 1:
            best_rank, best = None, None
            for pair in zip(word[:-1], word[1:]):
                rank = self.bpe_ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                # Merge left to right, without overlap, every occurrence of the best pair.
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = tuple(word)
        if len(self._cache) < 100_000:
            self._cache[piece] = result
        return result

    def encode(self, text: str) -> list[int]:
        """One string -> BPE ids without BOS/EOS, padding or truncation."""
        ids = []
        for segment in self._raw_pattern.split(text):
            if segment in self._special:
                ids.append(self._special[segment])
                continue
            normalized = self.normalize(segment)
            parts = self._normalized_pattern.split(normalized) if self._normalized_pattern else [normalized]
            for part in parts:
                if part in self.normalized_special_tokens:
                    ids.append(self._special[part])
                    continue
                for piece in (p for word in CLIP_PATTERN.findall(part) for p in GPT2_PATTERN.findall(word)):
                    mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                    ids.extend(self.encoder.get(sym, self.unk_id) for sym in self._bpe(mapped))
        return ids

    def __call__(
        self, texts: str | Sequence[str], max_length: int | None = None, truncation: bool = True
    ) -> TokenizedText:
        """Strings -> ``TokenizedText`` ids int32 [B, L], mask bool [B, L] with ``L = max_length``
        (default ``self.max_length``). With ``truncation=False`` an overlong text raises ValueError."""
        length = self.max_length if max_length is None else max_length
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {length!r}")
        rows = []
        for text in _as_batch(texts):
            body = self.encode(text)
            if len(body) > length - 2:
                if not truncation:
                    raise ValueError(f"text has {len(body) + 2} tokens, more than max_length={length}: {text[:40]!r}")
                body = body[: length - 2]
            rows.append([self.bos_id, *body, self.eos_id])
        return _pack(rows, length, self.pad_id)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text; ``</w>`` becomes a space. Unknown ids raise ValueError."""
        special = {self.bos_id, self.eos_id, self.pad_id} if skip_special_tokens else set()
        pieces = []
        for i in ids:
            i = int(i)
            if i in special:
                continue
            if i not in self.decoder:
                raise ValueError(f"token id {i} is not in the vocabulary")
            pieces.append(self.decoder[i])
        text = "".join(pieces)
        data = bytearray()
        out = []
        for ch in text.replace(END_OF_WORD, " "):
            if ch in self.byte_decoder:
                data.append(self.byte_decoder[ch])
            else:  # a special token's own characters
                out.append(data.decode("utf-8", errors="replace"))
                data = bytearray()
                out.append(ch)
        out.append(data.decode("utf-8", errors="replace"))
        return "".join(out).strip()
