r"""Teachers with other tokenizers: position alignment by character offsets and a sparse vocabulary map.

Every model tokenizes the same raw text with its own tokenizer (`MultiTokenizerCollator`); a teacher's predictions
are then brought to the student's positions and vocabulary before they enter the usual loss:

* **Positions** (exact). Student position t (which predicts token t+1) is aligned with teacher position j when both
  contexts end at the same character and both next tokens start at the same character (leading whitespace of the
  next token skipped, so tokenizers that leave whitespace out of their offsets still line up):
  `(end(t), start(t+1)) == (end'(j), start'(j+1))`. Both models then condition on the same text and predict a token
  that starts at the same place. A student position without such a twin gets weight 0 for that teacher.
* **Vocabulary** (exact where strings match, approximate elsewhere). Each token is decoded to the bytes it stands
  for, normalising byte-level BPE (`Ġ` = space), SentencePiece/Metaspace (`▁` = space, `<0xAB>` byte fallback) and
  WordPiece (`##` continuation) conventions. A teacher token goes to the student token with the same bytes
  (exact); failing that, to the student token whose bytes are the longest prefix of its own, i.e. the student
  token that begins its decoding (an approximation: the rest of the teacher token is dropped); failing that (or
  for special tokens other than bos/eos/pad/unk, which map by role) it is unmapped. The teacher's tempered
  distribution is summed onto the student's vocabulary, $\tilde p_k(s) = \sum_{v \to s} p_k(v) / (1 - u_k)$, the
  unmapped mass $u_k$ being renormalised away (and reported). With `cross_tokenizer_prefix_mass` off, tokens mapped
  by prefix count as unmapped there: only exact twins (and the chains below) carry mass.
* **Chains** (exact along the teacher's own tokens). Where the teacher spells the student's next token as several
  tokens of its own, its probability of that whole token, chained over them, moves onto it from the student token
  that its first token maps to (`hf_mtkd.token_chains`, `cross_tokenizer_chains`).

Temperature: the map is applied to $p_k = \mathrm{softmax}(z_k/\tau)$ and the result is handed to the loss as the
logits $\tau \log \tilde p_k$ (`MappedTeacher.scaled_log_probs`), so the loss's $\mathrm{softmax}(\cdot/\tau)$
recovers $\tilde p_k$ exactly; the entropy weighting sees the entropy of $\tilde p_k$. Label-aware weightings read
$\log \tilde p_k$ at temperature 1 as $\tau \log \tilde p_k$ renormalised, which is exact when $\tau = 1$ or the map
is one-to-one.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging

from .chat_data import EncodedExample, ExampleRenderer, check_fast_tokenizer
from .chunked import auto_chunk_size, shift_labels
from .dtypes import upcast
from .logit_free import HeadLogits
from .model_config import text_config
from .prompt_evidence import prompt_targets, row_sums, token_log_probs
from .storage import RowsOnDemand
from .teachers import pad_rows, teacher_forward, vocab_size
from .token_chains import (
    CHAIN_STOP_KEY,
    TokenChains,
    chain_stops,
    interior_positions,
    rest_log_probs,
    text_start,
)

logger = logging.get_logger(__name__)

CROSS_TOKENIZER_MODES = ("auto", "always", "never")
CROSS_TOKENIZER_LOSSES = ("kl", "uld")
"""The KD term with cross-tokenizer teachers: `divergence` of the fused target (`kl`), or ULD (`uld`)."""
TEACHER_INPUTS_KEY = "teacher_inputs"
"""Batch key under which `MultiTokenizerCollator` puts each teacher's own inputs (None for shared tokenizers)."""
PROMPT_CONTENT_KEY = "mtkd_prompt_content"
"""
Batch key of `MultiTokenizerCollator`'s `[B, T]` mask of the student's positions whose next token is prompt text
inside a message (`prompt_content`): where `prompt_evidence` reads the prompt when some teacher reads its own tokens.
"""
LOG_ZERO = -100.0
"""
Log-probability given to student tokens that no teacher token maps to: exp(-100) < 4e-44, nothing next to any real
probability, while log-probabilities (the teacher's NLL, label-aware weightings) stay finite and bounded.
"""

_SPECIAL_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---- decoded bytes of each token ----


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE uses for each byte (the GPT-2 convention), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()


def _components(spec: Any) -> list[dict[str, Any]]:
    """Every typed component (decoder, pre-tokenizer, ...) nested in a tokenizer.json section."""
    if isinstance(spec, dict):
        found = [spec] if "type" in spec else []
        return found + [c for value in spec.values() for c in _components(value)]
    if isinstance(spec, list):
        return [c for value in spec for c in _components(value)]
    return []


@dataclass(frozen=True)
class _Conventions:
    byte_level: bool = False
    space_marker: str | None = None
    byte_fallback: bool = False
    continuation_prefix: str | None = None


def _conventions(tokenizer: PreTrainedTokenizerBase) -> _Conventions:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    components = _components([spec.get("decoder"), spec.get("pre_tokenizer")])
    types = {c["type"] for c in components}
    marker = next((c.get("replacement", "▁") for c in components if c["type"] == "Metaspace"), None)
    for c in components:  # SentencePiece decoders written as Replace("▁", " ")
        if c["type"] == "Replace" and c.get("content") == " " and isinstance(c.get("pattern"), dict):
            marker = marker or c["pattern"].get("String")
    prefix = next((c.get("prefix", "##") for c in components if c["type"] == "WordPiece"), None)
    return _Conventions("ByteLevel" in types, marker, "ByteFallback" in types, prefix)


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """
    The bytes each token id of `tokenizer` stands for in text, None for special tokens and empty tokens.

    Byte-level tokens are mapped back through the byte alphabet; SentencePiece's space marker becomes a space and
    `<0xAB>` byte-fallback tokens their byte; a WordPiece continuation `##ing` is `ing` and a word-initial `the` is
    ` the` (an approximation: WordPiece does not record whether a space preceded the word).
    """
    check_fast_tokenizer(tokenizer, "the vocabulary to decode")
    conventions = _conventions(tokenizer)
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    result: list[bytes | None] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token is None or i in special or token == "":
            result.append(None)
        elif conventions.byte_level and all(c in _BYTE_LEVEL for c in token):
            result.append(bytes(_BYTE_LEVEL[c] for c in token))
        elif conventions.byte_fallback and (match := _BYTE_FALLBACK.fullmatch(token)):
            result.append(bytes([int(match.group(1), 16)]))
        else:
            if conventions.space_marker:
                token = token.replace(conventions.space_marker, " ")
            if conventions.continuation_prefix:
                prefix = conventions.continuation_prefix
                token = token[len(prefix) :] if token.startswith(prefix) else " " + token
            result.append(token.encode("utf-8") or None)
    return result


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """
    Whether two tokenizers share one vocabulary (the same token for every id), so that a teacher can read the
    student's ids and score the student's vocabulary directly. Their pre-tokenization rules may still differ (a
    tokenizer class may rebuild them from the vocabulary), as for any teacher fed the student's tokens.
    """
    return a is b or a.get_vocab() == b.get_vocab()


# ---- the vocabulary map ----


@dataclass
class MappedTeacher:
    """A teacher's tempered distribution on the student's vocabulary, with what the map lost or approximated."""

    scaled_log_probs: Tensor
    """`[..., V_s]` $\\tau \\log \\tilde p$ (logits at temperature tau): `softmax(them / tau)` is $\\tilde p$."""
    unmapped_mass: Tensor
    """`[...]` teacher probability (at temperature tau) on tokens with no student counterpart, renormalised away."""
    inexact_mass: Tensor
    """`[...]` teacher probability on tokens mapped to a student token that only begins their text."""
    has_mass: Tensor
    """`[...]` bool, False where all of the teacher's mass was unmapped (the teacher is then unavailable there)."""


class VocabularyMap:
    """
    A sparse map from a teacher's token ids to the student's: `index[v]` is the student id of teacher token v (or
    -1, unmapped) and `exact[v]` says whether their texts are equal; see the module docstring. With `prefix_mass`
    False, a token mapped by prefix only (not exactly) carries no mass: its probability is renormalised away, as an
    unmapped token's is.
    """

    def __init__(self, index: Tensor, exact: Tensor, student_vocab_size: int, *, prefix_mass: bool = True) -> None:
        self.index, self.exact, self.student_vocab_size = index, exact, student_vocab_size
        self.mapped = index >= 0
        self.prefix_mass = prefix_mass

    @property
    def carried(self) -> Tensor:
        """`[V_k]` bool, the teacher tokens whose probability goes onto the student's vocabulary."""
        return self.mapped if self.prefix_mass else self.mapped & self.exact

    @classmethod
    def build(
        cls,
        teacher_tokenizer: PreTrainedTokenizerBase,
        student_tokenizer: PreTrainedTokenizerBase,
        *,
        teacher_vocab_size: int | None = None,
        student_vocab_size: int | None = None,
        prefix_mass: bool = True,
    ) -> VocabularyMap:
        """
        The map between two tokenizers. The vocabulary sizes are the widths of the models' logits (default: the
        tokenizers' lengths); logit rows beyond a tokenizer's length stay unmapped.
        """
        teacher_size = teacher_vocab_size or len(teacher_tokenizer)
        student_size = student_vocab_size or len(student_tokenizer)
        index = torch.full((teacher_size,), -1, dtype=torch.long)
        exact = torch.zeros(teacher_size, dtype=torch.bool)
        if same_tokenizer(teacher_tokenizer, student_tokenizer):
            shared = min(teacher_size, student_size, len(teacher_tokenizer))
            index[:shared] = torch.arange(shared)
            exact[:shared] = True
            return cls(index, exact, student_size, prefix_mass=prefix_mass)
        lookup: dict[bytes, int] = {}
        for i, text in enumerate(token_bytes(student_tokenizer)):
            if text is not None and i < student_size:
                lookup.setdefault(text, i)
        longest = max(map(len, lookup), default=0)
        for v, text in enumerate(token_bytes(teacher_tokenizer)[:teacher_size]):
            if text is None:
                continue
            if text in lookup:
                index[v], exact[v] = lookup[text], True
                continue
            for n in range(min(len(text) - 1, longest), 0, -1):
                if text[:n] in lookup:
                    index[v] = lookup[text[:n]]
                    break
        for role in _SPECIAL_ROLES:
            t, s = getattr(teacher_tokenizer, role, None), getattr(student_tokenizer, role, None)
            if t is not None and s is not None and t < teacher_size and s < student_size:
                index[t], exact[t] = s, True
        return cls(index, exact, student_size, prefix_mass=prefix_mass)

    def coverage(self) -> dict[str, float]:
        """Fractions of the teacher's vocabulary mapped exactly, approximately (by prefix) and not at all."""
        size = max(self.index.numel(), 1)
        exact = int(self.exact.sum())
        mapped = int(self.mapped.sum())
        return {"exact": exact / size, "prefix": (mapped - exact) / size, "unmapped": 1 - mapped / size}

    def project(self, teacher_logits: Tensor, temperature: float = 1.0) -> MappedTeacher:
        r"""$\tilde p(s) = \sum_{v \to s} p(v) / \sum_{v\ mapped} p(v)$, $p = \mathrm{softmax}(z/\tau)$, as logits."""
        probs = self.probs(teacher_logits, temperature)
        scaled_log_probs, total = self._scaled_log_probs(probs, temperature)
        unmapped, inexact = self.masses(probs)
        return MappedTeacher(scaled_log_probs, unmapped, inexact, has_mass=total[..., 0] > 0)

    def probs(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        r"""The teacher's tempered distribution $p = \mathrm{softmax}(z/\tau)$ `[..., V_k]`, float32 (or wider)."""
        if teacher_logits.shape[-1] != self.index.numel():
            raise ValueError(
                f"Teacher logits have {teacher_logits.shape[-1]} entries per position but the vocabulary map was "
                f"built for {self.index.numel()}."
            )
        device = teacher_logits.device
        if self.index.device != device:
            self.index, self.exact, self.mapped = self.index.to(device), self.exact.to(device), self.mapped.to(device)
        return torch.softmax(upcast(teacher_logits) / temperature, dim=-1)

    def scaled_log_probs(
        self, teacher_logits: Tensor, temperature: float = 1.0, chains: TokenChains | None = None
    ) -> Tensor:
        r"""
        `project(...).scaled_log_probs` alone, $\tau \log \tilde p$ `[..., V_s]` (what the loss reads); with the
        rows' `chains` `[n]`, each chain's mass moved onto the student's token (`hf_mtkd.token_chains`).
        """
        return self._scaled_log_probs(self.probs(teacher_logits, temperature), temperature, chains)[0]

    def _scaled_log_probs(
        self, probs: Tensor, temperature: float, chains: TokenChains | None = None
    ) -> tuple[Tensor, Tensor]:
        carried = self.carried
        mapped = probs.new_zeros(*probs.shape[:-1], self.student_vocab_size)
        mapped.index_add_(-1, self.index[carried], probs[..., carried])
        if chains is not None:
            chains.move(mapped, probs, self.index, carried)
        total = mapped.sum(dim=-1, keepdim=True)
        log_probs = (mapped / total.clamp(min=torch.finfo(total.dtype).tiny)).log().clamp(min=LOG_ZERO)
        return temperature * log_probs, total

    def masses(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Of a tempered distribution `[..., V_k]`: its mass on unmapped tokens and on prefix-mapped ones `[...]`."""
        return probs[..., ~self.mapped].sum(dim=-1), probs[..., self.mapped & ~self.exact].sum(dim=-1)


@dataclass(frozen=True)
class MappedLogits(RowsOnDemand):
    r"""
    A cross-tokenizer teacher's distribution on the student's vocabulary, as the logits $\tau \log \tilde p$ of
    `VocabularyMap.project`, made a chunk of rows at a time from the teacher's own logits at the student's positions
    when the loss reads them: the `[B, T, V_s]` tensor never exists. Where the teacher is not aligned a row is 0 (a
    uniform distribution, which the teacher's mask gives no weight).

    `own` is the teacher's own logits `[B, T, V_k]` at the student's positions (its `[B, T_k, V_k]` logits gathered
    at the position map), or, logit-free, its `HeadLogits` at the student's valid positions: its final hidden states
    there and its output head, so that not even the teacher's own `[N, V_k]` logits exist.
    """

    own: Tensor | HeadLogits
    vocabulary_map: VocabularyMap
    temperature: float
    aligned: Tensor
    """`[B, T]` bool, the student positions that have an aligned teacher position."""
    index: Tensor | None = None
    """The flat positions (into B x T) of the rows, in order, when `packed` (None: every flat position)."""
    chains: TokenChains | None = None
    """`[B, T]` the student tokens the teacher spells as several of its own, whose mass then moves onto them."""

    @property
    def packed(self) -> bool:
        return self.index is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        width = self.vocabulary_map.student_vocab_size
        return (1, self.index.numel(), width) if self.packed else (*self.aligned.shape, width)

    def own_rows(self, rows: slice | Tensor) -> Tensor:
        """The teacher's own logits `[n, V_k]` of the rows `rows`, float32 (or wider)."""
        if isinstance(self.own, HeadLogits):
            return self.own.dense(rows)
        flat = self.own.reshape(-1, self.own.shape[-1])
        return upcast(flat[rows] if self.index is None else flat[self.index[rows]])

    def positions(self, rows: slice | Tensor) -> Tensor:
        """The flat positions (into B x T) of the rows `rows`."""
        if self.index is not None:
            return self.index[rows]
        return torch.arange(self.aligned.numel(), device=self.aligned.device)[rows]

    def dense(self, rows: slice | Tensor) -> Tensor:
        positions = self.positions(rows)
        aligned = self.aligned.flatten()[positions]
        chains = None if self.chains is None else self.chains.at(positions)
        scaled = self.vocabulary_map.scaled_log_probs(self.own_rows(rows), self.temperature, chains)
        return scaled.where(aligned[:, None], 0.0)

    def detach(self) -> MappedLogits:
        return replace(self, own=self.own.detach())

    def at_valid(self, mask: Tensor) -> MappedLogits:
        index = mask.flatten().nonzero().squeeze(1)
        if self.index is None:
            return replace(self, index=index)
        if not torch.equal(self.index, index):
            raise ValueError("Mapped teacher logits given at other positions than the labels' valid ones.")
        return self

    def masses(self, chunk_size: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        `[B, T]`: the teacher's probability on unmapped and on prefix-mapped tokens, whether it has mass on mapped
        ones (`MappedTeacher`), and the mass its chains moved onto the student's tokens, at the aligned positions
        among its rows (0, 0, False and 0 elsewhere), read `chunk_size` rows at a time (None:
        `hf_mtkd.chunked.auto_chunk_size` of the teacher's vocabulary).
        """
        vocabulary_map = self.vocabulary_map
        flat = self.aligned.flatten()
        rows = flat[self.positions(slice(None))].nonzero().squeeze(1)  # the rows at aligned positions
        dtype = upcast(self.own_rows(rows[:0])).dtype
        unmapped, inexact, chained = (flat.new_zeros(flat.shape, dtype=dtype) for _ in range(3))
        has_mass = torch.zeros_like(flat)
        size = chunk_size or auto_chunk_size(vocabulary_map.index.numel())
        for start in range(0, rows.numel(), size):
            chunk = rows[start : start + size]
            at = self.positions(chunk)
            probs = vocabulary_map.probs(self.own_rows(chunk), self.temperature)
            unmapped[at], inexact[at] = vocabulary_map.masses(probs)
            has_mass[at] = probs[:, vocabulary_map.carried].sum(dim=-1) > 0
            if self.chains is not None:
                chained[at] = self.chains.at(at).amounts(probs, vocabulary_map.index, vocabulary_map.carried)[0]
                has_mass[at] |= chained[at] > 0
        shape = self.aligned.shape
        return unmapped.view(shape), inexact.view(shape), has_mass.view(shape), chained.view(shape)


# ---- position alignment ----


def boundary_keys(text: str, offsets: Sequence[Sequence[int]], special: Sequence[int] | None = None) -> list[Any]:
    """
    For each position j of one tokenized text, `(end of its context, start of the next token)` in characters, or
    None where position j predicts nothing alignable: the next token is special or missing, or shares a character
    with token j (the pieces of a character split into bytes). A leading special token (BOS) ends an empty context.
    """
    special = special or [0] * len(offsets)
    keys: list[Any] = [None] * len(offsets)
    seen_text = False
    for j in range(len(offsets) - 1):
        if special[j]:
            end = 0 if not seen_text else None
        else:
            seen_text, end = True, offsets[j][1]
        if end is None or special[j + 1]:
            continue
        if offsets[j + 1][0] < end:
            continue
        keys[j] = (end, text_start(text, offsets[j + 1]))
    return keys


def align_positions(
    text: str,
    student_offsets: Sequence[Sequence[int]],
    teacher_offsets: Sequence[Sequence[int]],
    student_special: Sequence[int] | None = None,
    teacher_special: Sequence[int] | None = None,
) -> list[int]:
    """For each student position, the teacher position with the same context end and next-token start, or -1."""
    return _match(
        boundary_keys(text, student_offsets, student_special), boundary_keys(text, teacher_offsets, teacher_special)
    )


def segment_keys(keys: Sequence[Any], segments: Sequence[tuple[int, int] | None]) -> list[Any]:
    """
    Boundary keys of one rendering moved into message coordinates: `(i, end - a_i, start - a_i)` where the context
    ends and the next token starts in the content `[a_i, b_i)` of message i (the context may end at `a_i`, the next
    token must start before `b_i`); None elsewhere (the template's own text differs from model to model).
    """
    moved: list[Any] = []
    for key in keys:
        found = None
        if key is not None:
            end, start = key
            for i, segment in enumerate(segments):
                if segment is not None and segment[0] <= end <= start < segment[1]:
                    found = (i, end - segment[0], start - segment[0])
                    break
        moved.append(found)
    return moved


def align_encoded(student: EncodedExample, teacher: EncodedExample) -> list[int]:
    """
    `align_positions` for two renderings of one example that may differ around its messages (each model's chat
    template): positions are matched inside the same message content, by offsets relative to its start.
    """

    def keys(encoded: EncodedExample) -> list[Any]:
        raw = boundary_keys(encoded.rendered.text, encoded.offsets, encoded.special)
        return segment_keys(raw, encoded.rendered.segments)

    return _match(keys(student), keys(teacher))


def _match(student_keys: Sequence[Any], teacher_keys: Sequence[Any]) -> list[int]:
    """For each student key, the first teacher position with the same key, or -1."""
    teacher_positions: dict[Any, int] = {}
    for j, key in enumerate(teacher_keys):
        if key is not None:
            teacher_positions.setdefault(key, j)
    return [-1 if key is None else teacher_positions.get(key, -1) for key in student_keys]


# ---- the collator ----


class MultiTokenizerCollator:
    """
    Batches raw text for cross-tokenizer distillation: the student's `input_ids`, `attention_mask` and `labels`,
    and under `teacher_inputs` one dict per teacher with its own `input_ids`, `attention_mask` and `position_map`
    (`[B, T_student]`, the teacher position aligned with each student position, -1 where none) and `chain_stop`
    (`hf_mtkd.token_chains.chain_stops`), or None for a teacher that shares the student's tokenizer.

    The contract: each example holds its raw text under `text_column`. The student's tokens are truncated to
    `max_length`; every teacher then tokenizes the same character span (the text up to the end of the student's
    last token), so all models see the same text; a teacher's tokens beyond its `teacher_max_lengths` entry are cut
    and its positions there stay unaligned. Padding is on the right; labels are -100 on padding.

    With a `renderer` (prompt/completion or conversational data, `hf_mtkd.chat_data`), each model renders the
    example itself, conversations with its own chat template; the student's labels are -100 outside the completion
    or assistant turns, each teacher reads its whole rendering (cut to its `teacher_max_lengths` entry) and is
    aligned inside the message contents (`align_encoded`) at the positions whose next token carries loss (so the
    teacher's predictions are mapped nowhere else). `teacher_names` name the teachers in errors.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizers: Sequence[PreTrainedTokenizerBase | None],
        *,
        max_length: int | None = None,
        teacher_max_lengths: Sequence[int | None] | None = None,
        text_column: str = "text",
        renderer: ExampleRenderer | None = None,
        teacher_names: Sequence[str] | None = None,
    ) -> None:
        for name, tok in [
            ("the student", tokenizer),
            *((f"teacher {k}", t) for k, t in enumerate(teacher_tokenizers)),
        ]:
            if tok is not None:
                check_fast_tokenizer(tok, name)
        self.tokenizer, self.teacher_tokenizers = tokenizer, list(teacher_tokenizers)
        self.max_length, self.text_column = max_length, text_column
        self.teacher_max_lengths = list(teacher_max_lengths or [None] * len(self.teacher_tokenizers))
        self.renderer = renderer
        self.teacher_names = list(teacher_names or [str(k) for k in range(len(self.teacher_tokenizers))])

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns the collator reads."""
        return self.renderer.columns if self.renderer is not None else (self.text_column,)

    def _encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int | None) -> Any:
        return tokenizer(
            texts,
            truncation=max_length is not None,
            max_length=max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if self.renderer is not None:
            return self._collate_rendered(features)
        if any(self.text_column not in f for f in features):
            raise ValueError(
                f"Cross-tokenizer distillation tokenizes raw text for every model, but an example has no "
                f"{self.text_column!r} field (it has {sorted(features[0])}). Keep the raw text in the dataset, "
                "unlike the usual pre-tokenized blocks."
            )
        texts = [f[self.text_column] for f in features]
        student = self._encode(self.tokenizer, texts, self.max_length)
        spans = [
            max((end for (_, end), s in zip(offsets, special, strict=True) if not s), default=0)
            for offsets, special in zip(student["offset_mapping"], student["special_tokens_mask"], strict=True)
        ]
        input_ids = pad_rows(student["input_ids"], self.tokenizer.pad_token_id or 0)
        attention_mask = pad_rows(student["attention_mask"], 0)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }
        teacher_inputs: list[dict[str, Tensor] | None] = []
        for tokenizer, max_length in zip(self.teacher_tokenizers, self.teacher_max_lengths, strict=True):
            if tokenizer is None:
                teacher_inputs.append(None)
                continue
            cut = [text[:end] for text, end in zip(texts, spans, strict=True)]
            teacher = self._encode(tokenizer, cut, max_length)
            maps = [
                align_positions(text, s_off, t_off, s_special, t_special)
                for text, s_off, t_off, s_special, t_special in zip(
                    cut,
                    student["offset_mapping"],
                    teacher["offset_mapping"],
                    student["special_tokens_mask"],
                    teacher["special_tokens_mask"],
                    strict=True,
                )
            ]
            stops = [
                chain_stops(text, s_off, position_map, text, t_off, t_special)
                for text, s_off, position_map, t_off, t_special in zip(
                    cut,
                    student["offset_mapping"],
                    maps,
                    teacher["offset_mapping"],
                    teacher["special_tokens_mask"],
                    strict=True,
                )
            ]
            teacher_inputs.append(
                {
                    "input_ids": pad_rows(teacher["input_ids"], tokenizer.pad_token_id or 0),
                    "attention_mask": pad_rows(teacher["attention_mask"], 0),
                    "position_map": pad_rows(maps, -1),
                    CHAIN_STOP_KEY: pad_rows(stops, -1),
                }
            )
        batch[TEACHER_INPUTS_KEY] = teacher_inputs
        return batch

    def _collate_rendered(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        renderer = self.renderer
        student = [renderer.encode(f, self.tokenizer, self.max_length) for f in features]
        input_ids = pad_rows([e.input_ids for e in student], self.tokenizer.pad_token_id or 0)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": pad_rows([[1] * len(e.input_ids) for e in student], 0),
            "labels": pad_rows([e.labels for e in student], -100),
            PROMPT_CONTENT_KEY: pad_rows([prompt_content(e) for e in student], 0).bool(),
        }
        teacher_inputs: list[dict[str, Tensor] | None] = []
        for tokenizer, max_length, name in zip(
            self.teacher_tokenizers, self.teacher_max_lengths, self.teacher_names, strict=True
        ):
            if tokenizer is None:
                teacher_inputs.append(None)
                continue
            owner = f"teacher {name!r}"
            teacher = [
                renderer.encode(f, tokenizer, max_length, owner=owner, template_flag="teacher_chat_template_path")
                for f in features
            ]
            maps = [_learned_only(align_encoded(s, t), s.labels) for s, t in zip(student, teacher, strict=True)]
            stops = [
                chain_stops(s.rendered.text, s.offsets, position_map, t.rendered.text, t.offsets, t.special)
                for s, position_map, t in zip(student, maps, teacher, strict=True)
            ]
            teacher_inputs.append(
                {
                    "input_ids": pad_rows([e.input_ids for e in teacher], tokenizer.pad_token_id or 0),
                    "attention_mask": pad_rows([[1] * len(e.input_ids) for e in teacher], 0),
                    "position_map": pad_rows(maps, -1),
                    CHAIN_STOP_KEY: pad_rows(stops, -1),
                    "prompt_mask": pad_rows([prompt_content(e) for e in teacher], 0).bool(),
                }
            )
        batch[TEACHER_INPUTS_KEY] = teacher_inputs
        return batch


def prompt_content(encoded: EncodedExample) -> list[int]:
    """
    1 at each position whose next token is a prompt token (without a label) lying wholly inside a message's content
    (its leading whitespace aside), else 0: the prompt text that every model reads alike, whatever its chat template
    adds around it (`prompt_evidence` with teachers on their own tokenizers).
    """
    text, segments = encoded.rendered.text, [s for s in encoded.rendered.segments if s is not None]
    marks = [0] * len(encoded.input_ids)
    for j in range(len(marks) - 1):
        start, stop = encoded.offsets[j + 1]
        while start < stop and text[start].isspace():
            start += 1
        inside = start < stop and any(a <= start and stop <= b for a, b in segments)
        marks[j] = int(inside and encoded.labels[j + 1] == -100 and not encoded.special[j + 1])
    return marks


def _learned_only(position_map: list[int], labels: Sequence[int]) -> list[int]:
    """A position map kept where the student's next token carries loss (-1 elsewhere: no teacher work there)."""
    return [j if t + 1 < len(labels) and labels[t + 1] != -100 else -1 for t, j in enumerate(position_map)]


# ---- choosing the mode and running a cross-tokenizer teacher ----


def uses_cross_tokenizer(
    names: Sequence[str],
    tokenizers: Sequence[PreTrainedTokenizerBase | None],
    student_tokenizer: Any,
    mode: str = "auto",
) -> list[bool]:
    """
    Whether each teacher runs in cross-tokenizer mode: the one rule, which the trainer
    (`resolve_teacher_tokenizers`) and the example script both apply.

    `tokenizers` are the teachers' own (None where unknown). `auto`: a teacher whose tokenizer is known and differs
    from the student's (`same_tokenizer`); a teacher on the student's tokenizer stays on the shared vocabulary even
    when its embedding has more or fewer (padding) rows (see `hf_mtkd.teachers`), and so does one whose tokenizer
    is unknown (its vocabulary size must then equal the student's). `always`: every teacher. `never`: none, and a
    known different tokenizer is an error.
    """
    if mode not in CROSS_TOKENIZER_MODES:
        raise ValueError(f"Unknown `cross_tokenizer` {mode!r}; choose one of {list(CROSS_TOKENIZER_MODES)}.")
    student_is_tokenizer = isinstance(student_tokenizer, PreTrainedTokenizerBase)
    cross = []
    for name, tokenizer in zip(names, tokenizers, strict=True):
        differs = tokenizer is not None and student_is_tokenizer and not same_tokenizer(tokenizer, student_tokenizer)
        if mode == "never" and differs:
            raise ValueError(
                f"Teacher {name!r} uses a different tokenizer from the student ({len(tokenizer)} vs "
                f"{len(student_tokenizer)} tokens) and `cross_tokenizer='never'`. Set `cross_tokenizer='auto'` "
                "to align it by character offsets and map its vocabulary, or use a teacher with the student's "
                "tokenizer."
            )
        cross.append(mode == "always" or differs)
    return cross


def resolve_teacher_tokenizers(
    specs: Sequence[nn.Module | str | os.PathLike],
    teachers: Sequence[nn.Module],
    names: Sequence[str],
    student: nn.Module,
    student_tokenizer: Any,
    teacher_tokenizers: Sequence[PreTrainedTokenizerBase | str | None] | None,
    mode: str = "auto",
) -> list[PreTrainedTokenizerBase | None]:
    """
    Each teacher's tokenizer when it runs in cross-tokenizer mode (`uses_cross_tokenizer`), None when it reads the
    student's ids.

    Tokenizers come from `teacher_tokenizers` (tokenizers or names/paths, None to look them up), else from the
    teacher's own directory when it was given as a path. A teacher whose tokenizer cannot be found and whose
    vocabulary size differs from the student's is refused: whether it only pads the student's vocabulary or has
    another one cannot be told.
    """
    if teacher_tokenizers is not None and len(teacher_tokenizers) != len(teachers):
        raise ValueError(
            f"`teacher_tokenizers` has {len(teacher_tokenizers)} entries but there are {len(teachers)} teachers: give "
            "one per teacher (None to use the teacher's own)."
        )
    found: list[PreTrainedTokenizerBase | None] = []
    for spec, tokenizer in zip(specs, teacher_tokenizers or [None] * len(teachers), strict=True):
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        elif tokenizer is None and isinstance(spec, (str, os.PathLike)):
            try:
                tokenizer = AutoTokenizer.from_pretrained(spec)
            except (OSError, ValueError):
                tokenizer = None
        found.append(tokenizer)
    resolved: list[PreTrainedTokenizerBase | None] = []
    cross = uses_cross_tokenizer(names, found, student_tokenizer, mode)
    for teacher, name, tokenizer, crossed in zip(teachers, names, found, cross, strict=True):
        sizes = vocab_size(teacher), vocab_size(student)
        if tokenizer is None and (crossed or sizes[0] != sizes[1]):
            why = "has a vocabulary of {} tokens but the student has {}".format(*sizes) if sizes[0] != sizes[1] else ""
            raise ValueError(
                f"Teacher {name!r} {why or 'runs in cross-tokenizer mode'}. Its tokenizer is missing (it was given "
                "as a model, or its directory holds none): pass it in `teacher_tokenizers=[...]` (one entry "
                "per teacher, None for the others; the student's own if the teacher only pads its embedding), or "
                "`--teacher_tokenizer_name` in the example script. A teacher with another tokenizer then runs in "
                "cross-tokenizer mode."
            )
        if not crossed:
            resolved.append(None)
            continue
        if not isinstance(student_tokenizer, PreTrainedTokenizerBase):
            raise ValueError(
                f"Teacher {name!r} needs the cross-tokenizer mode (its tokenizer differs from the student's, or "
                "`cross_tokenizer='always'`), which tokenizes raw text for every model: pass the student's tokenizer "
                "as `processing_class`."
            )
        check_fast_tokenizer(student_tokenizer, "the student")
        check_fast_tokenizer(tokenizer, f"teacher {name!r}")
        resolved.append(tokenizer)
    return resolved


@dataclass
class AlignedTeacher:
    """A cross-tokenizer teacher's outputs at the student's positions and on the student's vocabulary."""

    mapped: MappedLogits
    """Its distribution mapped onto the student's vocabulary, as logits at temperature tau made chunk by chunk."""
    own_logits: Tensor | None
    """`[B, T, V_k]` the teacher's own logits at the aligned positions (for the ULD loss); None when logit-free."""
    hidden_states: tuple[Tensor, ...] | None
    """Each `[B, T, D_k]`, at the aligned positions, when asked."""
    available: Tensor
    """`[B, T]` bool, where the teacher is aligned (and has mapped mass)."""
    unmapped_mass: Tensor
    """`[B, T]` see `MappedTeacher`."""
    inexact_mass: Tensor
    """`[B, T]` see `MappedTeacher`."""
    chained_mass: Tensor
    """`[B, T]` the mass its chains moved onto the student's next token (`hf_mtkd.token_chains`), 0 where none."""
    prompt_row_log_prob: Tensor | None = None
    """`[B]` per row, its floored log-likelihood of its own prompt tokens (`prompt_mask`), when asked."""


def teacher_on_student_positions(
    teacher: nn.Module,
    name: str,
    inputs: Mapping[str, Tensor],
    vocabulary_map: VocabularyMap,
    *,
    temperature: float,
    output_hidden_states: bool,
    run_head: Callable[..., Any] | None = None,
    mask: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    student_labels: Tensor | None = None,
) -> AlignedTeacher:
    """
    Run a teacher on its own tokens and gather its predictions at the student's positions (`position_map`). With
    `run_head` (`hf_mtkd.heads.LogitFreePlan.run_teacher` for it) and the student's valid positions `mask`, it runs
    logit-free where it can: its final hidden states at those positions and its head instead of its logits. With
    `prompt_mask` `[B, T_k]` (its own positions before a prompt token, `prompt_content`), its log-likelihood of them
    per row too (`prompt_evidence`; its head runs there as well). With the student's `student_labels` and the
    inputs' `chain_stop`, its probability of each student token that it spells as several of its own moves onto
    that token (`hf_mtkd.token_chains`; its head runs inside those chains as well).
    """
    forward = functools.partial(teacher_forward, teacher, name, inputs, output_hidden_states=output_hidden_states)
    input_ids, position_map = inputs["input_ids"], inputs["position_map"]
    aligned = position_map >= 0
    rows = torch.arange(position_map.shape[0], device=position_map.device)[:, None]
    index = position_map.clamp(min=0)
    chain_stop = None if student_labels is None else inputs.get(CHAIN_STOP_KEY)
    interior = None
    if chain_stop is not None:
        chain_stop = chain_stop.where(aligned, -1)
        interior = interior_positions(position_map, chain_stop, input_ids.shape[1])
    asked = [m for m in (prompt_mask, interior) if m is not None]
    own_positions = functools.reduce(torch.logical_or, asked) if asked else None
    head = own_head = None
    if run_head is None:
        logits, hidden = forward()
    else:
        (logits, hidden), head = run_head(forward, position_map=position_map, own_positions=own_positions)
    if head is not None:  # its head at the aligned valid positions, then at its own asked positions
        count = int(mask.sum())
        head, own_head = head.take(slice(0, count)), head.take(slice(count, None))

    def own_log_probs(positions: Tensor, tau: float) -> Tensor:
        """Its log-probabilities at temperature `tau` of its next tokens at its own `positions` `[B, T_k]`."""
        targets = prompt_targets(input_ids, positions)
        if own_head is None:
            return token_log_probs(logits, targets, positions.flatten().nonzero()[:, 0], tau)
        return token_log_probs(own_head.take(positions[own_positions]), targets, temperature=tau)

    prompt_row_log_prob = None
    if prompt_mask is not None:
        prompt_row_log_prob = row_sums(own_log_probs(prompt_mask, 1.0), prompt_mask)
    chains = None
    if chain_stop is not None:
        rest = rest_log_probs(own_log_probs(interior, temperature), interior, position_map, chain_stop)
        first = input_ids.gather(1, (position_map + 1).clamp(0, input_ids.shape[1] - 1))
        target = shift_labels(student_labels)
        chained = (chain_stop >= 0) & (target >= 0)
        chains = TokenChains(first.where(chained, 0), target.clamp(min=0), rest, chained)
    if head is None:
        own = logits[rows, index]
        mapped = MappedLogits(own, vocabulary_map, temperature, aligned, chains=chains)
    else:
        own = None
        packed = mask.flatten().nonzero().squeeze(1)
        mapped = MappedLogits(head, vocabulary_map, temperature, aligned, index=packed, chains=chains)
    unmapped, inexact, has_mass, chained_mass = mapped.masses()
    return AlignedTeacher(
        mapped=mapped,
        own_logits=own,
        hidden_states=None if hidden is None else tuple(h[rows, index] for h in hidden),
        available=aligned & has_mass,
        unmapped_mass=unmapped,
        inexact_mass=inexact,
        chained_mass=chained_mass,
        prompt_row_log_prob=prompt_row_log_prob,
    )


def build_vocabulary_maps(
    teachers: Sequence[nn.Module],
    names: Sequence[str],
    teacher_tokenizers: Sequence[PreTrainedTokenizerBase | None],
    student: nn.Module,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    prefix_mass: bool,
) -> list[VocabularyMap | None]:
    """
    One `VocabularyMap` per cross-tokenizer teacher (None for the others), with its coverage logged; `prefix_mass`:
    whether tokens mapped by prefix carry their mass (`VocabularyMap`).
    """
    maps: list[VocabularyMap | None] = []
    for teacher, name, tokenizer in zip(teachers, names, teacher_tokenizers, strict=True):
        if tokenizer is None:
            maps.append(None)
            continue
        vocabulary_map = VocabularyMap.build(
            tokenizer,
            student_tokenizer,
            teacher_vocab_size=vocab_size(teacher),
            student_vocab_size=vocab_size(student),
            prefix_mass=prefix_mass,
        )
        coverage = vocabulary_map.coverage()
        logger.info(
            "Teacher %r runs in cross-tokenizer mode: of its %d tokens, %.1f%% map exactly onto the student's "
            "vocabulary, %.1f%% to the student token that begins their text, %.1f%% nowhere.",
            name,
            vocabulary_map.index.numel(),
            100 * coverage["exact"],
            100 * coverage["prefix"],
            100 * coverage["unmapped"],
        )
        maps.append(vocabulary_map)
    return maps


def max_positions(model: nn.Module) -> int | None:
    """The longest input a model accepts (`max_position_embeddings` of its text config), if it says."""
    return getattr(text_config(model), "max_position_embeddings", None)


def check_text_column(collator: Any, *datasets: Any) -> None:
    """A cross-tokenizer collator reads raw text: refuse up front a dataset of token ids only."""
    if not isinstance(collator, MultiTokenizerCollator):
        return
    for dataset in datasets:
        for split in dataset.values() if isinstance(dataset, dict) else [dataset]:
            columns = getattr(split, "column_names", None)
            if columns is not None and collator.renderer is not None:
                missing = [c for c in collator.columns if c not in columns]
                if missing:
                    raise ValueError(f"The dataset has no {missing} column(s) (it has {columns}) to render.")
            elif columns is not None and collator.text_column not in columns:
                raise ValueError(
                    f"Cross-tokenizer distillation needs the raw text, but the dataset has no "
                    f"{collator.text_column!r} column (it has {columns}). Each model tokenizes the text with its own "
                    "tokenizer, so keep the text column instead of pre-tokenized ids; the collator truncates it."
                )


def check_token_ids_column(*datasets: Any) -> None:
    """Teachers on the student's vocabulary read token ids: refuse up front a dataset of raw text only."""
    for dataset in datasets:
        for split in dataset.values() if isinstance(dataset, dict) else [dataset]:
            columns = getattr(split, "column_names", None)
            if columns is not None and "input_ids" not in columns:
                raise ValueError(
                    f"The dataset has no 'input_ids' column (it has {columns}), but teachers that share the "
                    "student's tokenizer read token ids: tokenize it first, e.g. `dataset.map(lambda batch: "
                    "tokenizer(batch['text']), batched=True, remove_columns=['text'])`, or set "
                    "`cross_tokenizer='always'` to distill on the raw text."
                )
