r"""
Instruction and chat data: the dataset formats TRL users have, rendered, tokenized and masked for distillation.

Formats, detected from the columns (`detect_format`):

* `text`: plain text (`{"text": "..."}`); every token carries loss.
* `prompt_completion`: `{"prompt": ..., "completion": ...}`, both strings (standard) or both lists of
  `{"role", "content"}` messages (conversational). With `completion_only_loss` only the completion's tokens carry
  loss.
* `messages`: `{"messages": [{"role", "content"}, ...]}` (conversational). With `assistant_only_loss` only the
  assistant turns carry loss.
* `prompt`: `{"prompt": ...}` alone, a string or a list of messages (rendered with the generation prompt), for
  on-policy distillation (`hf_mtkd.on_policy`), where the completions are generated; no token carries loss.

Conversational rows are rendered with the tokenizer's chat template. Which characters belong to a completion or to
an assistant turn is found by rendering prefixes of the conversation: assistant turn i spans the characters from
the end of `render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i + 1])`, so it holds
what the model generates for that turn, its end-of-turn marker included (no `{% generation %}` markers needed).
Should a template render an earlier turn differently once later turns follow (so that a prefix's rendering is not a
prefix of the whole), the turn falls back to the characters of its content. A token carries loss when its first
character lies in such a span (`EncodedExample.labels`, -100 elsewhere); the tokens come with their character offsets,
so a fast tokenizer is needed. Standard formats get the tokenizer's special tokens and an EOS token appended.

Every model renders the same conversation with its own template, so the renderings differ around the messages but
each message's content appears in each of them: `RenderedExample.segments` are the character spans of the contents,
one per message, which cross-tokenizer alignment matches span by span (see `hf_mtkd.cross_tokenizer`).

Packing (`pack_dataset`) puts short tokenized examples one after the other into rows of at most `max_length`
tokens, with `position_ids` restarting at 0 for each example and the first label of each example -100; a batch
without `attention_mask` but with such `position_ids` gets a block-diagonal causal mask from transformers (sdpa,
eager and flash attention alike), so attention does not cross examples, and the `posterior` weighting restarts its
running sums where `position_ids == 0`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, PreTrainedTokenizerBase

DATA_FORMATS = ("text", "prompt_completion", "messages", "prompt")
FORMAT_COLUMNS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "prompt": ("prompt",),
}
"""The columns each format reads."""


def detect_format(columns: Iterable[str], prompts_alone: bool = False) -> str | None:
    """
    The data format of a dataset with these columns: `messages`, `prompt_completion` or `text`, and with
    `prompts_alone` (every completion is generated) `prompt`; None when it has none of their columns (e.g. already
    tokenized data).
    """
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if prompts_alone and "prompt" in columns:
        return "prompt"
    if "prompt" in columns or "completion" in columns:
        present, missing = ("prompt", "completion") if "prompt" in columns else ("completion", "prompt")
        raise ValueError(
            f"The dataset has a {present!r} column but no {missing!r} column: prompt/completion data needs both "
            "(strings, or lists of {'role', 'content'} messages), or give the text under 'text' or 'messages'. "
            "Prompts alone train on-policy only, where every completion is generated (lmbda=1, or seq_kd)."
        )
    return "text" if "text" in columns else None


def dataset_format(*datasets: Any, prompts_alone: bool = False) -> str | None:
    """The format (`detect_format`) of the first of `datasets` (or of their splits) that has known columns."""
    for dataset in datasets:
        for split in dataset.values() if isinstance(dataset, Mapping) else [dataset]:
            columns = getattr(split, "column_names", None)
            if columns is not None:
                return detect_format(columns, prompts_alone)
    return None


def load_chat_template(path: str) -> str:
    """A chat template from a file (e.g. `template.jinja`) or from the tokenizer in a directory or Hub repository."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = getattr(AutoTokenizer.from_pretrained(path), "chat_template", None)
    if not template:
        raise ValueError(f"The tokenizer of {path!r} has no chat template; give a .jinja file or another tokenizer.")
    return template


def set_chat_template(tokenizer: PreTrainedTokenizerBase, path: str | None) -> None:
    """Give `tokenizer` the chat template of `path` (`load_chat_template`); nothing when `path` is None."""
    if path:
        tokenizer.chat_template = load_chat_template(path)


def check_fast_tokenizer(tokenizer: Any, owner: str, purpose: str = "cross-tokenizer alignment") -> None:
    """Refuse a slow tokenizer (of `owner`, e.g. "the student"): `purpose` reads character offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The tokenizer of {owner} ({type(tokenizer).__name__}) is not a fast tokenizer: {purpose} needs "
            "character offsets, which only fast (🤗 tokenizers-backed) tokenizers give. Load it with "
            "`AutoTokenizer.from_pretrained(..., use_fast=True)` or convert it to a `PreTrainedTokenizerFast`."
        )


@dataclass(frozen=True)
class RenderedExample:
    """One example as the text a model reads, with the character spans that carry loss and the message contents."""

    text: str
    loss_spans: tuple[tuple[int, int], ...]
    """Character spans `[start, end)` whose tokens carry loss."""
    segments: tuple[tuple[int, int] | None, ...]
    """Per message (or the whole text), the span of its content in `text` (None where the template changed it)."""
    standard: bool
    """Plain strings: the tokenizer adds its special tokens and an EOS token is appended (when `closed`)."""
    closed: bool = True
    """Whether the text is complete: False for a prompt, or a generated completion cut before its EOS."""


@dataclass(frozen=True)
class EncodedExample:
    """A rendered example tokenized, with each token's character offsets."""

    rendered: RenderedExample
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    special: list[int]


@dataclass(frozen=True)
class ExampleRenderer:
    """
    Renders examples of one format (`DATA_FORMATS`) with a tokenizer's chat template and marks what carries loss;
    `owner` names the tokenizer in errors, `template_flag` the setting that supplies a missing template.
    """

    data_format: str
    completion_only_loss: bool = True
    assistant_only_loss: bool = True
    text_column: str = "text"

    def __post_init__(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"Unknown data format {self.data_format!r}; choose one of {list(DATA_FORMATS)}.")

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns the renderer reads."""
        return (self.text_column,) if self.data_format == "text" else FORMAT_COLUMNS[self.data_format]

    def render(
        self,
        example: Mapping[str, Any],
        tokenizer: PreTrainedTokenizerBase,
        *,
        owner: str = "the student",
        template_flag: str = "chat_template_path",
    ) -> RenderedExample:
        """The text `tokenizer`'s model reads for `example`, with its loss spans and message segments."""
        if self.data_format == "text":
            text = example[self.text_column]
            return RenderedExample(text, ((0, len(text)),), ((0, len(text)),), standard=True)
        if self.data_format == "messages":
            messages = _messages(example["messages"], "messages")
            if self.assistant_only_loss and not any(m["role"] == "assistant" for m in messages):
                raise ValueError(
                    f"A conversation has no assistant turn (roles {[m['role'] for m in messages]}), so with "
                    "`assistant_only_loss` nothing in it is learned: drop such rows, or set assistant_only_loss=False "
                    "(--assistant_only_loss false) to learn every token."
                )
            learned = [m["role"] == "assistant" for m in messages] if self.assistant_only_loss else None
            return _render_conversation(tokenizer, messages, learned, owner, template_flag)
        if self.data_format == "prompt":
            return _render_prompt(tokenizer, example["prompt"], owner, template_flag)
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise ValueError(
                "A prompt/completion row mixes a string with a list of messages: give both as strings (standard) or "
                "both as lists of {'role', 'content'} messages (conversational)."
            )
        if isinstance(prompt, str):
            if not completion:
                raise ValueError("A prompt/completion row has an empty completion: there is nothing to learn in it.")
            text = prompt + completion
            start = len(prompt) if self.completion_only_loss else 0
            return RenderedExample(text, ((start, len(text)),), ((0, len(text)),), standard=True)
        prompt, completion = _messages(prompt, "prompt"), _messages(completion, "completion")
        if not completion:
            raise ValueError("A conversational prompt/completion row has no completion message: nothing to learn.")
        learned = [False] * len(prompt) + [True] * len(completion) if self.completion_only_loss else None
        return _render_conversation(tokenizer, prompt + completion, learned, owner, template_flag)

    def encode(
        self,
        example: Mapping[str, Any],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        **render_kwargs: Any,
    ) -> EncodedExample:
        """`render`, then tokenize with offsets (cut to `max_length` tokens); labels -100 outside the loss spans."""
        return encode_rendered(self.render(example, tokenizer, **render_kwargs), tokenizer, max_length)


def encode_rendered(
    rendered: RenderedExample, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> EncodedExample:
    """Tokenize a rendered example with character offsets; a token carries loss when it starts in a loss span."""
    check_fast_tokenizer(tokenizer, "the data", purpose="marking completion and assistant tokens")
    encoding = tokenizer(
        rendered.text,
        add_special_tokens=rendered.standard,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    ids, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    special = list(encoding["special_tokens_mask"])
    in_loss = [end > start and any(a <= start < b for a, b in rendered.loss_spans) for start, end in offsets]
    eos = tokenizer.eos_token_id
    if rendered.standard and rendered.closed and eos is not None and (not ids or ids[-1] != eos):
        end = len(rendered.text)
        ids, offsets, special = [*ids, eos], [*offsets, (end, end)], [*special, 1]
        in_loss.append(any(b == end for _, b in rendered.loss_spans))
    if max_length is not None:
        ids, offsets, special = ids[:max_length], offsets[:max_length], special[:max_length]
        in_loss = in_loss[:max_length]
    labels = [i if keep else -100 for i, keep in zip(ids, in_loss, strict=True)]
    return EncodedExample(rendered, ids, labels, offsets, special)


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    """A list of `{role, content}` messages with text content, or one clear error."""
    if isinstance(value, Mapping) or not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"`{column}` must be a list of {{'role', 'content'}} messages, got {type(value).__name__}.")
    messages = []
    for message in value:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"`{column}` holds {message!r}, not a {{'role', 'content'}} message.")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"A {message['role']!r} message of `{column}` has non-text content "
                f"({type(message['content']).__name__}); only text messages are supported."
            )
        messages.append({key: v for key, v in message.items() if v is not None})
    return messages


def _render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Any, owner: str, template_flag: str) -> RenderedExample:
    """A prompt alone (a string, or messages rendered with the generation prompt); no character carries loss."""
    if isinstance(prompt, str):
        return RenderedExample(prompt, (), ((0, len(prompt)),), standard=True, closed=False)
    messages = _messages(prompt, "prompt")
    text = _render(tokenizer, messages, True, owner, template_flag)
    segments, cursor = [], 0
    for message in messages:
        found = text.find(message["content"], cursor) if message["content"] else -1
        segments.append(None if found < 0 else (found, found + len(message["content"])))
        cursor = cursor if found < 0 else found + len(message["content"])
    return RenderedExample(text, (), tuple(segments), standard=False, closed=False)


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    owner: str,
    template_flag: str,
) -> str:
    """`messages` through the tokenizer's chat template, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer of {owner} has no chat template, but the data is conversational: give one with "
            f"`{template_flag}` (--{template_flag}), a .jinja file or a tokenizer directory that has one."
        )
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja's TemplateError and the template's own raise_exception
        raise ValueError(f"The chat template of {owner} cannot render a conversation: {err}") from None


def _render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    learned: list[bool] | None,
    owner: str,
    template_flag: str,
) -> RenderedExample:
    """
    A conversation rendered whole, with each message's content span and, as loss spans, the turns marked in
    `learned` (every character when None); see the module docstring.

    Message i's content is searched in the characters its prefix rendering adds (or, where the template renders
    the prefix otherwise, anywhere after the previous content). A learned turn runs from the end of the rendering
    of the messages before it with the generation prompt to the end of the rendering through it; a run of learned
    messages (a completion of several messages) is one span.
    """
    text = _render(tokenizer, messages, False, owner, template_flag)
    through = [_render(tokenizer, messages[: i + 1], False, owner, template_flag) for i in range(len(messages))]
    segments: list[tuple[int, int] | None] = []
    cursor = 0
    for message, block in zip(messages, through, strict=True):
        content = message["content"]
        end = len(block) if text.startswith(block) else len(text)
        found = text.find(content, cursor, end) if content else -1
        if found < 0 and end < len(text) and content:
            found = text.find(content, cursor)
        segments.append(None if found < 0 else (found, found + len(content)))
        cursor = end if found < 0 else found + len(content)
    if learned is None:
        return RenderedExample(text, ((0, len(text)),), tuple(segments), standard=False)
    spans: list[tuple[int, int]] = []
    for i, message_learned in enumerate(learned):
        if not message_learned or (i > 0 and learned[i - 1]):
            continue
        last = i
        while last + 1 < len(learned) and learned[last + 1]:
            last += 1
        before = _render(tokenizer, messages[:i], True, owner, template_flag)
        after = through[last]
        if text.startswith(after) and after.startswith(before) and len(before) < len(after):
            spans.append((len(before), len(after)))
        else:  # the template renders the turns differently once more follow: their contents only
            spans.extend(s for s in segments[i : last + 1] if s is not None)
    return RenderedExample(text, tuple(spans), tuple(segments), standard=False)


# ---- datasets: tokenized for one tokenizer, packed, and batched ----


def tokenize_dataset(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    renderer: ExampleRenderer,
    *,
    max_length: int | None = None,
    packing: bool = False,
    keep_columns: Sequence[str] = (),
    map_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """
    A `datasets` dataset in `renderer`'s format as `input_ids` and `labels` (-100 outside the loss spans), each
    example cut to `max_length` tokens; with `packing`, packed into rows of `max_length` (`pack_dataset`).
    `keep_columns` (e.g. a routing column) are kept when present; an example that cannot be rendered is named.
    """
    if packing and max_length is None:
        raise ValueError("Packing needs a row length: set `max_length` (--block_size in the example script).")
    columns = list(dataset.column_names or next(iter(dataset)))  # a stream may not know its columns up front
    kept = [c for c in keep_columns if c in columns]
    if packing and kept:
        raise ValueError(
            f"Packing puts several examples in one row, so a per-example column ({', '.join(kept)}) cannot be kept: "
            "turn packing off, or drop the column."
        )

    def encode(example: dict[str, Any], index: int) -> dict[str, list[int]]:
        try:
            encoded = renderer.encode(example, tokenizer, max_length)
        except ValueError as err:
            raise ValueError(f"Example {index}: {err}") from None
        return {"input_ids": encoded.input_ids, "labels": encoded.labels}

    tokenized = dataset.map(
        encode, with_indices=True, remove_columns=[c for c in columns if c not in kept], **(map_kwargs or {})
    )
    return pack_dataset(tokenized, max_length, map_kwargs) if packing else tokenized


def pack_rows(examples: Mapping[str, Sequence[Sequence[int]]], max_length: int) -> dict[str, list[list[int]]]:
    """
    Examples (`input_ids`, `labels`) placed one after the other, in order, into rows of at most `max_length`
    tokens; a row is closed when the next example does not fit. `position_ids` restart at 0 for each example, and
    each example's first label is -100 (nothing predicts it from the previous example).
    """
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in zip(examples["input_ids"], examples["labels"], strict=True):
        ids, labels = list(ids)[:max_length], list(labels)[:max_length]
        if not ids:
            continue
        if not rows["input_ids"] or len(rows["input_ids"][-1]) + len(ids) > max_length:
            for row in rows.values():
                row.append([])
        rows["input_ids"][-1] += ids
        rows["labels"][-1] += [-100, *labels[1:]]
        rows["position_ids"][-1] += list(range(len(ids)))
    return rows


def pack_dataset(dataset: Any, max_length: int, map_kwargs: Mapping[str, Any] | None = None) -> Any:
    """A tokenized dataset (`input_ids`, `labels`) packed with `pack_rows` (in batches of 1000 examples)."""
    kwargs = dict(map_kwargs or {})
    if "desc" in kwargs:
        kwargs["desc"] = f"Packing examples into rows of {max_length} tokens"
    return dataset.map(
        pack_rows,
        batched=True,
        fn_kwargs={"max_length": max_length},
        remove_columns=list(dataset.column_names or []),
        **kwargs,
    )


class CompletionCollator:
    """
    Pads tokenized examples on the right and keeps their `labels` (padded with -100). Packed examples (with
    `position_ids`) get no `attention_mask`: the padding continues as one more example of its own (`position_ids`
    0, 1, ...), so that transformers builds the block-diagonal causal mask from the `position_ids`.
    """

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = pad_token_id or 0

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        batch: dict[str, Any] = {
            "input_ids": _pad([f["input_ids"] for f in features], width, lambda n: [self.pad_token_id] * n),
            "labels": _pad(
                [f["labels"] if "labels" in f else f["input_ids"] for f in features], width, lambda n: [-100] * n
            ),
        }
        if packed:
            batch["position_ids"] = _pad([f["position_ids"] for f in features], width, lambda n: list(range(n)))
        else:
            batch["attention_mask"] = _pad([[1] * len(f["input_ids"]) for f in features], width, lambda n: [0] * n)
        return batch


def _pad(rows: Sequence[Sequence[int]], width: int, fill: Callable[[int], list[int]]) -> torch.Tensor:
    return torch.tensor([[*row, *fill(width - len(row))] for row in rows], dtype=torch.long)


# ---- what the trainer does with a dataset ----


def trainer_renderer(args: Any, *datasets: Any, cross_tokenizer: bool) -> ExampleRenderer | None:
    """
    The renderer the trainer applies to its datasets (`args` a `MultiTeacherDistillationConfig`), or None when it
    reads them as they are: prompt/completion and conversational data always (and prompts alone when every batch
    is generated: `lmbda=1` or `seq_kd`); plain text (without `input_ids`) when it is packed, on the student's
    tokenizer. Cross-tokenizer teachers read plain text as it is; token ids
    asked to be packed must come packed (with `position_ids`).
    """
    data_format = dataset_format(*datasets, prompts_alone=args.lmbda == 1 or args.seq_kd)
    if args.packing and cross_tokenizer:
        raise ValueError(
            "`packing` needs teachers on the student's tokenizer (each cross-tokenizer teacher reads its own "
            "rendering of every example). Set packing=False, or use teachers that share the student's tokenizer."
        )
    columns = _columns(*datasets)
    if data_format in ("messages", "prompt_completion", "prompt"):
        return ExampleRenderer(data_format, args.completion_only_loss, args.assistant_only_loss)
    if args.packing and not cross_tokenizer:
        if data_format == "text" and "input_ids" not in columns:
            return ExampleRenderer("text")
        if "input_ids" in columns and "position_ids" not in columns:
            raise ValueError(
                f"`packing` packs the data the trainer tokenizes (text, prompt/completion, messages), but the dataset "
                f"holds token ids already (columns {sorted(columns)}): pack it first with "
                "`hf_mtkd.chat_data.pack_dataset` (it needs `labels`), or give the raw text."
            )
    return None


def _columns(*datasets: Any) -> set[str]:
    """The columns of `datasets` (or of their splits) that say what they hold (a stream may say nothing)."""
    return {
        column
        for dataset in datasets
        for split in (dataset.values() if isinstance(dataset, Mapping) else [dataset])
        for column in (getattr(split, "column_names", None) or [])
    }


def default_collator(tokenizer: PreTrainedTokenizerBase, *datasets: Any) -> Any:
    """
    The collator for tokenized data: `CompletionCollator` when the data holds `labels` or `position_ids` (kept),
    else `DataCollatorForLanguageModeling(tokenizer, mlm=False)` (labels from the ids).
    """
    if _columns(*datasets) & {"labels", "position_ids"}:
        return CompletionCollator(tokenizer.pad_token_id)
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)
