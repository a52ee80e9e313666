"""
Distill one or more teacher causal language models into a student on a text dataset: transformers' `run_clm.py`,
with teachers.

The same flags as `run_clm.py` (the student is `--model_name_or_path`, or `--config_name`/`--model_type` with
`--config_overrides` for a new one), plus `--teacher_model_name_or_path A B C`, the distillation settings of
`MultiTeacherDistillationConfig` and `--do_generate_eval`. Instead of flags, a single .json or .yaml file of the
same arguments may be given. Run it as `python examples/run_clm_distill.py ...` or `hf-mtkd distill ...`.

Teachers may use other tokenizers than the student (each its own, or `--teacher_tokenizer_name`): they are then
distilled in cross-tokenizer mode (see `hf_mtkd.cross_tokenizer`), on the raw texts, each cut to `--block_size`
student tokens, instead of concatenated token blocks.

The data may also be in the formats TRL's SFT trainer reads (see `hf_mtkd.chat_data` and docs/chat.md): prompt/
completion pairs (strings, or lists of messages) and conversations (`messages`), from `--dataset_name` or .json,
.jsonl or .parquet files. Conversations are rendered with each model's chat template (`--chat_template_path` for a
tokenizer without one); only completions and assistant turns carry loss (`--completion_only_loss`,
`--assistant_only_loss`); `--packing` packs short examples into rows of `--block_size` tokens without attention
across them. Rendered and tokenized here on the student's tokenizer, such data also works with
`--teacher_logits_cache`.

When the data has the `--routing_column` (`teacher_ids` by default, see `hf_mtkd.routing`), each text is routed to
the teachers it names. Blocks concatenated from several texts would mix rows routed to different teachers, so each
text is then one example of its own, cut to `--block_size` tokens, and keeps its routing value.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import datasets
import transformers
import yaml
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    default_data_collator,
    set_seed,
)

from .chat_data import CompletionCollator, ExampleRenderer, detect_format, set_chat_template, tokenize_dataset
from .config import MultiTeacherDistillationConfig
from .cross_tokenizer import uses_cross_tokenizer
from .distributed import process_group_scope
from .dtypes import DTYPE_CHOICES, torch_dtype
from .hub import check_push_access
from .model_config import text_config
from .parameters import count_parameters
from .pruning import student_from_teacher
from .redaction import redact_arguments_file, redact_argv
from .teacher_cache import StaleCacheError, TeacherLogitsCache, cache_teacher_logits
from .teachers import teacher_names, unloadable_teacher_message
from .trainer import MultiTeacherDistillationTrainer

logger = transformers.utils.logging.get_logger(__name__)

MODEL_TYPES = sorted({config.model_type for config in MODEL_FOR_CAUSAL_LM_MAPPING.keys()})
DATA_FILE_BUILDERS = {"txt": "text", "json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
"""Extensions accepted for `--train_file`/`--validation_file` and the `datasets` builder that reads each."""


@dataclass
class ModelArguments:
    """The teachers, and the student to train (from a checkpoint or from scratch)."""

    teacher_model_name_or_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "One or more teachers (required): Hub model ids or local directories of causal LMs, e.g. "
            "`--teacher_model_name_or_path gpt2-large gpt2-medium`. A teacher whose tokenizer differs from the "
            "student's is distilled in cross-tokenizer mode (see --cross_tokenizer)."
        },
    )
    teacher_tokenizer_name: list[str] | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (name or path) of each teacher, one per teacher in the order of "
            "--teacher_model_name_or_path. Default: each teacher's own."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The student's checkpoint (Hub model id or local directory). Leave it out to train a new student "
            "from --config_name or --model_type (with --config_overrides)."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Architecture of a new student when neither model nor config is given, e.g. gpt2, llama, qwen2 "
            "(any causal LM type of transformers)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Settings that override the config of a new student, e.g. `n_layer=4,n_embd=256` (with "
            "--config_name or --model_type; not with --model_name_or_path)."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config (name or path) of the student, if not the one of --model_name_or_path."},
    )
    student_from_teacher_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Cut the student from the first teacher (depth pruning): one number N keeps N evenly spaced "
            "decoder layers (the first and the last among them), several numbers are the indices of the layers to "
            "keep; embeddings, final norm and head are copied. Not with --model_name_or_path, --config_name or "
            "--model_type."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "The student's tokenizer (name or path). Default: the student's (--model_name_or_path), else the "
            "first teacher's."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where to store models and datasets downloaded from the Hub."},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Use a fast (tokenizers-backed) tokenizer."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The student's revision (branch name, tag or commit id)."},
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models or datasets (default: the one from `hf auth login`)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers defined by code in their Hub repository (read it first)."},
    )
    teacher_logits_cache: str | None = field(
        default=None,
        metadata={
            "help": "A directory for the teachers' top-k next-token logits: computed there once per split (resumable; "
            "`hf-mtkd cache-teachers` does only that) and trained on instead of running the teachers; a later run "
            "with the same teachers, tokenizer and data reuses it, and a stale one is refused. Not with "
            "--streaming or --alpha_feat."
        },
    )
    teacher_logits_top_k: int = field(
        default=64,
        metadata={"help": "Tokens kept per position and teacher in --teacher_logits_cache (the rest as one mass)."},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype to load the student in; 'auto' takes the checkpoint's. Teachers use --teacher_dtype.",
            "choices": list(DTYPE_CHOICES),
        },
    )

    def __post_init__(self) -> None:
        if not self.teacher_model_name_or_path:
            raise ValueError(
                "No teacher given: pass one or more with --teacher_model_name_or_path (Hub ids or local directories)."
            )
        if self.model_type is not None and self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"--model_type {self.model_type!r} is not a causal LM architecture of transformers; use one of "
                f"{', '.join(MODEL_TYPES)}."
            )
        if self.teacher_tokenizer_name is not None and len(self.teacher_tokenizer_name) != len(
            self.teacher_model_name_or_path
        ):
            raise ValueError(
                f"--teacher_tokenizer_name has {len(self.teacher_tokenizer_name)} entries but there are "
                f"{len(self.teacher_model_name_or_path)} teachers: give one per teacher, in the same order."
            )
        if self.student_from_teacher_layers is not None and (
            self.model_name_or_path or self.config_name or self.model_type
        ):
            raise ValueError(
                "--student_from_teacher_layers cuts the student from the first teacher; leave out "
                "--model_name_or_path, --config_name and --model_type."
            )
        if self.config_overrides is not None and self.model_name_or_path is not None:
            raise ValueError(
                "--config_overrides changes the config of a new student and cannot be combined with "
                "--model_name_or_path; use --config_name or --model_type instead."
            )


@dataclass
class DataTrainingArguments:
    """The text to distill on and how it is cut into blocks."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset (Hub id, or a local directory of data files) to load with `datasets`."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of the dataset, e.g. wikitext-2-raw-v1."}
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a .txt (one text per line), .json, .jsonl, .csv or .parquet file. Besides plain "
            "text, rows may be prompt/completion pairs ('prompt' and 'completion' columns, strings or lists of "
            "messages) or conversations (a 'messages' column of {'role', 'content'} dicts), as TRL's SFT reads them."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data, in the same format as --train_file (.txt, .json, .jsonl, .csv, .parquet)."
        },
    )
    text_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the text. Default: 'text' when there is one, else the first column."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training blocks (for quick runs or debugging)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many evaluation blocks (for quick runs or debugging)."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading it first (training then needs --max_steps)."},
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Texts are concatenated and cut into blocks of this many tokens. Default: the longest input the "
            "tokenizer, the student and the teachers accept, at most 1024."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached preprocessed datasets."})
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "When the data has no validation split, the percentage of the training split held out for it. "
            "With --streaming, --max_eval_samples texts are held out instead."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Number of processes for tokenization and grouping."}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError(
                "No data given: pass --dataset_name, or --train_file and/or --validation_file (.txt, .json, .jsonl, "
                ".csv or .parquet)."
            )
        builders = {}
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is None:
                continue
            extension = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
            if extension not in DATA_FILE_BUILDERS:
                raise ValueError(
                    f"--{name} {path!r} should be a {', '.join('.' + e for e in DATA_FILE_BUILDERS)} file, got "
                    f"{'.' + extension if extension else 'no extension'}."
                )
            if not os.path.isfile(path) and "://" not in path and not any(c in path for c in "*?["):
                raise ValueError(
                    f"--{name} {path!r} does not exist: give the path of an existing .txt, .json, .jsonl, .csv or "
                    ".parquet file."
                )
            builders[name] = DATA_FILE_BUILDERS[extension]
        if len(set(builders.values())) > 1:
            raise ValueError(
                f"--train_file {self.train_file!r} and --validation_file {self.validation_file!r} have different "
                "formats; give both as .txt, both as .json/.jsonl, both as .csv or both as .parquet."
            )
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}."
            )
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"--block_size must be at least 2 tokens, got {self.block_size}.")


@dataclass
class GenerationEvalArguments:
    """Generation quality: the student and each teacher continue held-out prompts, scored with BLEU and ROUGE-L."""

    do_generate_eval: bool = field(
        default=False,
        metadata={
            "help": "After training/evaluation, let the student and each teacher greedily continue prompts cut from "
            "the validation texts, and score the continuations against the true ones (BLEU, ROUGE-L)."
        },
    )
    generate_eval_samples: int = field(default=64, metadata={"help": "Number of prompts to continue."})
    generate_prompt_length: int = field(
        default=32, metadata={"help": "Prompt length in tokens (shorter validation texts are skipped)."}
    )
    generate_max_new_tokens: int = field(
        default=32, metadata={"help": "Tokens generated per prompt, and the length of the true continuation."}
    )

    def __post_init__(self) -> None:
        for name in ("generate_eval_samples", "generate_prompt_length", "generate_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, GenerationEvalArguments, MultiTeacherDistillationConfig)


def build_parser(prog: str | None = None) -> HfArgumentParser:
    """The argument parser: model, data and generation-eval arguments, and `MultiTeacherDistillationConfig`."""
    return HfArgumentParser(ARGUMENT_CLASSES, prog=prog, description=__doc__)


def parse_args(parser: HfArgumentParser, args: Sequence[str]) -> tuple[Any, ...]:
    """Parse flags, or a single .json/.yaml file of arguments; an invalid argument exits with the parser's message."""
    try:
        if len(args) == 1 and args[0].endswith(".json"):
            return parser.parse_json_file(os.path.abspath(args[0]))
        if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
            return parser.parse_yaml_file(os.path.abspath(args[0]))
        return parser.parse_args_into_dataclasses(list(args), look_for_args_file=False)
    except (ValueError, OSError, yaml.YAMLError) as err:
        parser.error(str(err))


def training_command(prog: str, args: Sequence[str]) -> str:
    """
    The command line that ran the script, followed by the arguments file (as comments) when one was used, with
    every secret (a Hub token given as a flag, in a JSON argument, in the file or in the environment) redacted.
    """
    command = shlex.join([*shlex.split(prog), *redact_argv(args)])
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        with open(args[0], encoding="utf-8") as f:
            text = redact_arguments_file(f.read(), args[0])
        command += f"\n# {args[0]}:\n" + "\n".join(f"# {line}" for line in text.splitlines())
    return command


def setup_logging(training_args: MultiTeacherDistillationConfig) -> None:
    """Log to stdout, at info level on the main process (as transformers' example scripts do)."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logging.getLogger("hf_mtkd").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def load_raw_datasets(
    data_args: DataTrainingArguments, model_args: ModelArguments
) -> DatasetDict | IterableDatasetDict:
    """Train and validation texts from `--dataset_name` or the data files, holding out a validation split if needed."""
    load_kwargs = {"cache_dir": model_args.cache_dir, "token": model_args.token, "streaming": data_args.streaming}
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, **load_kwargs)
    else:
        data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
        data_files = {split: path for split, path in data_files.items() if path is not None}
        builder = DATA_FILE_BUILDERS[next(iter(data_files.values())).rsplit(".", 1)[-1].lower()]
        builder_kwargs = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
        raw = load_dataset(builder, data_files=data_files, **load_kwargs, **builder_kwargs)
    if "validation" in raw or "train" not in raw:
        return raw
    train = raw["train"]
    if isinstance(train, IterableDataset):
        if data_args.max_eval_samples is None:
            logger.warning("The streamed data has no validation split; give --max_eval_samples to hold texts out.")
            return raw
        raw["validation"] = train.take(data_args.max_eval_samples)
        raw["train"] = train.skip(data_args.max_eval_samples)
    elif data_args.validation_split_percentage > 0:
        num_validation = max(1, len(train) * data_args.validation_split_percentage // 100)
        raw["validation"] = train.select(range(num_validation))
        raw["train"] = train.select(range(num_validation, len(train)))
    return raw


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """Column names, also for a streamed dataset whose features are not known up front."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)))


def pick_text_column(columns: list[str], requested: str | None, parser: HfArgumentParser) -> str:
    """`requested` if the data has it, else 'text' when present, else the first column."""
    if requested is not None:
        if requested not in columns:
            parser.error(f"--text_column_name {requested!r} is not a column of the data; its columns are {columns}.")
        return requested
    return "text" if "text" in columns else columns[0]


def max_input_length(tokenizer: PreTrainedTokenizerBase, configs: Iterable[PretrainedConfig]) -> int:
    """The longest input the tokenizer and every model (student and teachers) accept."""
    lengths = [tokenizer.model_max_length]
    for config in configs:
        lengths += [getattr(text_config(config), "max_position_embeddings", None) or math.inf]
    return int(min(lengths))


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate tokenized texts and cut them into blocks of `block_size` (dropping the remainder); labels = ids."""
    concatenated = {key: list(chain.from_iterable(values)) for key, values in examples.items()}
    total_length = len(next(iter(concatenated.values()))) // block_size * block_size
    blocks = {
        key: [values[i : i + block_size] for i in range(0, total_length, block_size)]
        for key, values in concatenated.items()
    }
    blocks["labels"] = [ids.copy() for ids in blocks["input_ids"]]
    return blocks


def load_student(
    model_args: ModelArguments,
    teacher_config: PretrainedConfig,
    parser: HfArgumentParser,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """
    The student from `--model_name_or_path`, cut from the first teacher (`--student_from_teacher_layers`), or a new one
    from `--config_name`/`--model_type` (+ overrides) with `vocab_size` (default: the first teacher's).
    """
    kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    dtype = None if model_args.dtype is None else torch_dtype(model_args.dtype)
    if model_args.student_from_teacher_layers:
        layers = model_args.student_from_teacher_layers
        chosen = {"num_layers": layers[0]} if len(layers) == 1 else {"layers": layers}
        try:
            return student_from_teacher(
                model_args.teacher_model_name_or_path[0], **chosen, dtype=dtype, **{**kwargs, "revision": None}
            )
        except ValueError as err:
            parser.error(str(err))
    if model_args.config_name or model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path, **kwargs)
    elif model_args.model_type:
        config = CONFIG_MAPPING[model_args.model_type]()
    else:
        parser.error(
            "No student given: pass --model_name_or_path, or --config_name/--model_type (with --config_overrides) "
            "for a new one."
        )
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, dtype=dtype, **kwargs
        )
    if model_args.config_overrides:
        logger.info("Overriding the student's config with %s", model_args.config_overrides)
        config.update_from_string(model_args.config_overrides)
    target_vocab = vocab_size or text_config(teacher_config).vocab_size
    if text_config(config).vocab_size != target_vocab:
        logger.info("The new student gets a vocabulary of %d tokens, that of its tokenizer.", target_vocab)
        text_config(config).vocab_size = target_vocab
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code, dtype=dtype)
    logger.info("Training a new student from scratch: %.2fM parameters.", count_parameters(model) / 1e6)
    return model


def load_teacher_tokenizers(
    model_args: ModelArguments, hub_kwargs: dict[str, Any]
) -> list[PreTrainedTokenizerBase | None]:
    """Each teacher's tokenizer (from --teacher_tokenizer_name, else its own directory), None where it has none."""
    names = model_args.teacher_tokenizer_name or model_args.teacher_model_name_or_path
    tokenizers = []
    for name in names:
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(name, use_fast=True, **hub_kwargs))
        except (OSError, ValueError) as err:
            if model_args.teacher_tokenizer_name:
                raise ValueError(f"--teacher_tokenizer_name {name!r} cannot be loaded: {err}") from None
            tokenizers.append(None)
    return tokenizers


def _non_blank(text_column: str) -> Any:
    return lambda example: bool(example[text_column] and example[text_column].strip())


def prepare_text_datasets(
    raw: DatasetDict | IterableDatasetDict, text_column: str, routing_column: str | None = None
) -> DatasetDict | IterableDatasetDict:
    """
    Cross-tokenizer mode: the raw texts themselves, one example per non-blank text under `text`, which the collator
    tokenizes for every model (cut to --block_size student tokens); no concatenation into blocks. The
    `routing_column`, if given, is kept.
    """
    columns = column_names(next(iter(raw.values())))
    kept = {"text", routing_column} if text_column == "text" else {routing_column}
    texts = raw.map(
        lambda examples: {"text": examples[text_column]},
        batched=True,
        remove_columns=[c for c in columns if c not in kept],
    )
    return texts.filter(_non_blank("text"))


def _map_kwargs(data_args: DataTrainingArguments, description: str) -> dict[str, Any]:
    """`Dataset.map` settings from the data arguments; a stream is mapped lazily, without them."""
    if data_args.streaming:
        return {}
    return {
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
        "desc": description,
    }


def _collator(
    tokenizer: PreTrainedTokenizerBase, cross: bool, routing: str | None, renderer: ExampleRenderer | None
) -> Any:
    """
    The data collator: None (the trainer's, which pads) in cross-tokenizer mode or for routed texts, one that keeps
    the labels (and packed position ids) of rendered data, else `default_data_collator` for the equal blocks.
    """
    if cross or (routing and renderer is None):
        return None
    return default_data_collator if renderer is None else CompletionCollator(tokenizer.pad_token_id)


def _masking(renderer: ExampleRenderer, training_args: MultiTeacherDistillationConfig) -> str:
    """What carries loss in the renderer's format, for the log."""
    packing = ", packed into rows of --block_size tokens" if training_args.packing else ""
    if renderer.data_format == "messages" and renderer.assistant_only_loss:
        return "loss on the assistant turns only" + packing
    if renderer.data_format == "prompt_completion" and renderer.completion_only_loss:
        return "loss on the completions only" + packing
    if renderer.data_format == "prompt":
        return "prompts alone, every completion generated (on-policy or seq_kd)"
    return "loss on every token" + packing


def prepare_datasets(
    raw: DatasetDict | IterableDatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    data_args: DataTrainingArguments,
    training_args: MultiTeacherDistillationConfig,
    text_column: str,
    routing_column: str | None = None,
) -> DatasetDict | IterableDatasetDict:
    """
    Tokenize every split and group it into blocks of `block_size` tokens; with a `routing_column`, tokenize each
    non-blank text alone instead, cut to `block_size` tokens, and keep its routing value.
    """
    columns = column_names(next(iter(raw.values())))

    def map_kwargs(description: str) -> dict[str, Any]:
        return _map_kwargs(data_args, description)

    with training_args.main_process_first(desc="tokenizing and grouping"):
        if routing_column is not None:
            return raw.filter(_non_blank(text_column)).map(
                lambda examples: tokenizer(examples[text_column], truncation=True, max_length=block_size),
                batched=True,
                remove_columns=[c for c in columns if c != routing_column],
                **map_kwargs(f"Tokenizing each text, cut to {block_size} tokens"),
            )
        tokenized = raw.map(
            lambda examples: tokenizer(examples[text_column]),
            batched=True,
            remove_columns=columns,
            **map_kwargs("Tokenizing"),
        )
        return tokenized.map(
            group_texts,
            batched=True,
            fn_kwargs={"block_size": block_size},
            **map_kwargs(f"Grouping texts into blocks of {block_size}"),
        )


def main(args: Sequence[str] | None = None, prog: str | None = None, *, cache_only: bool = False) -> None:
    """
    Run the script with `args` (default: the command line); `prog` names the command in help and the model card.
    With `cache_only`, only write `--teacher_logits_cache` for the train and validation splits (no student). A
    process group started here (under a distributed launcher) is destroyed on the way out (after a barrier on return).
    """
    with process_group_scope():
        _main(args, prog, cache_only)


def _main(args: Sequence[str] | None, prog: str | None, cache_only: bool) -> None:
    if prog is None:  # how to run the same again, for help and the model card
        prog = f"python {sys.argv[0]}" if args is None else "python -m hf_mtkd.run_clm_distill"
    args = sys.argv[1:] if args is None else list(args)
    parser = build_parser(prog)
    model_args, data_args, generation_args, training_args = parse_args(parser, args)
    setup_logging(training_args)
    logger.warning(
        "Process rank %s, device %s, n_gpu %s, distributed: %s, 16-bit: %s",
        training_args.process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
        training_args.fp16 or training_args.bf16,
    )
    logger.info("Training/evaluation parameters %s", training_args)
    if cache_only and not model_args.teacher_logits_cache:
        parser.error("Give --teacher_logits_cache, the directory to write the teachers' logits to.")
    if training_args.push_to_hub and not cache_only:  # before any model, data or cache work
        try:
            check_push_access(
                training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir)),
                training_args.hub_token,
            )
        except ValueError as err:
            parser.error(str(err))
    if not (cache_only or training_args.do_train or training_args.do_eval or generation_args.do_generate_eval):
        logger.warning("None of --do_train, --do_eval and --do_generate_eval is set: there is nothing to do.")

    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    teacher_configs = []
    for teacher in model_args.teacher_model_name_or_path:
        try:
            teacher_configs.append(AutoConfig.from_pretrained(teacher, **hub_kwargs))
        except (OSError, ValueError) as err:
            parser.error(unloadable_teacher_message(teacher, err))
    training_args.teacher_model_init_kwargs = {
        **{key: value for key, value in hub_kwargs.items() if value},
        **(training_args.teacher_model_init_kwargs or {}),
    }
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args)
    tokenizer_source = (
        model_args.tokenizer_name or model_args.model_name_or_path or model_args.teacher_model_name_or_path[0]
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, use_fast=model_args.use_fast_tokenizer, **hub_kwargs)
    logger.info("Using the tokenizer of %s.", tokenizer_source)
    try:
        teacher_tokenizers = load_teacher_tokenizers(model_args, hub_kwargs)
        training_args.check_num_teachers(len(teacher_tokenizers))
        names = teacher_names(model_args.teacher_model_name_or_path, training_args.teacher_names)
        cross = any(uses_cross_tokenizer(names, teacher_tokenizers, tokenizer, training_args.cross_tokenizer))
    except ValueError as err:
        parser.error(str(err))
    if cross:
        logger.info("Some teacher has another tokenizer: distilling in cross-tokenizer mode, on the raw texts.")
        if model_args.teacher_logits_cache:
            parser.error(
                "--teacher_logits_cache needs teachers that share the student's tokenizer; in cross-tokenizer mode "
                "the teachers run live."
            )
    student = (
        None
        if cache_only
        else load_student(model_args, teacher_configs[0], parser, vocab_size=len(tokenizer) if cross else None)
    )

    raw_columns = column_names(next(iter(raw.values())))
    text_column = pick_text_column(raw_columns, data_args.text_column_name, parser)
    try:
        data_format = detect_format(raw_columns, prompts_alone=training_args.lmbda == 1 or training_args.seq_kd)
        set_chat_template(tokenizer, training_args.chat_template_path)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    renderer = None  # prompt/completion or chat data, or packed text: rendered and masked (hf_mtkd.chat_data)
    if data_format in ("messages", "prompt_completion", "prompt") or training_args.packing:
        if training_args.packing and cross:
            parser.error(
                "--packing needs teachers on the student's tokenizer (each cross-tokenizer teacher reads its own "
                "rendering of every example); leave --packing out."
            )
        renderer = ExampleRenderer(
            data_format if data_format in ("messages", "prompt_completion", "prompt") else "text",
            training_args.completion_only_loss,
            training_args.assistant_only_loss,
            text_column=text_column,
        )
        logger.info("The data is in the %r format: %s.", renderer.data_format, _masking(renderer, training_args))
    routing = training_args.routing_column if training_args.routing_column in raw_columns else None
    if routing is not None and not cross:
        logger.info(
            "The data has the routing column %r: each text is one example, cut to --block_size tokens, instead of "
            "concatenated blocks that would mix rows routed to different teachers.",
            routing,
        )
        if tokenizer.pad_token is None:  # examples of different lengths are padded
            tokenizer.pad_token = tokenizer.eos_token
    limit = max_input_length(tokenizer, [*([student.config] if student else []), *teacher_configs])
    block_size = data_args.block_size or min(1024, limit)
    if block_size > limit:
        logger.warning("--block_size %d is longer than the models accept; using %d.", block_size, limit)
        block_size = limit
    if training_args.max_length is None:
        training_args.max_length = block_size
    if cross and renderer is not None:
        lm_datasets = raw.select_columns([*renderer.columns, *([routing] if routing else [])])
        if training_args.cross_tokenizer_max_length is None:
            training_args.cross_tokenizer_max_length = block_size
    elif cross:
        lm_datasets = prepare_text_datasets(raw, text_column, routing)
        if training_args.cross_tokenizer_max_length is None:
            training_args.cross_tokenizer_max_length = block_size
    elif renderer is not None:
        if tokenizer.pad_token is None:  # examples of different lengths are padded
            tokenizer.pad_token = tokenizer.eos_token
        with training_args.main_process_first(desc="rendering and tokenizing"):
            try:
                lm_datasets = type(raw)(
                    {
                        split: tokenize_dataset(
                            dataset,
                            tokenizer,
                            renderer,
                            max_length=block_size,
                            packing=training_args.packing,
                            keep_columns=[routing] if routing else [],
                            map_kwargs=_map_kwargs(data_args, f"Rendering and tokenizing the {split} split"),
                        )
                        for split, dataset in raw.items()
                    }
                )
            except ValueError as err:
                parser.error(str(err))
    else:
        lm_datasets = prepare_datasets(raw, tokenizer, block_size, data_args, training_args, text_column, routing)

    train_dataset = eval_dataset = None
    if training_args.do_train or (cache_only and "train" in lm_datasets):
        train_dataset = _split(lm_datasets, "train", data_args.max_train_samples, block_size, parser)
    if training_args.do_eval or (cache_only and "validation" in lm_datasets):
        eval_dataset = _split(lm_datasets, "validation", data_args.max_eval_samples, block_size, parser)
    if generation_args.do_generate_eval and "validation" not in raw:
        parser.error("--do_generate_eval needs validation texts: give --validation_file or a validation split.")

    teachers: list[str] | TeacherLogitsCache = model_args.teacher_model_name_or_path
    if model_args.teacher_logits_cache:
        caches = _cache_teachers(model_args, training_args, tokenizer, train_dataset, eval_dataset, parser)
        if cache_only:
            return
        teachers = caches.get("train") or caches["validation"]
        train_dataset = caches["train"].dataset if "train" in caches else None
        eval_dataset = caches["validation"].dataset if "validation" in caches else None

    try:
        trainer = MultiTeacherDistillationTrainer(
            model=student,
            teachers=teachers,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=_collator(tokenizer, cross, routing, renderer),
            # the tokenizers found here, so that the trainer decides each teacher's mode on the same ones
            teacher_tokenizers=None if isinstance(teachers, TeacherLogitsCache) else teacher_tokenizers,
        )
    except ValueError as err:  # teachers that do not fit the student or the settings
        parser.error(str(err))
    trainer.training_command = training_command(prog, args)

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics.update(_num_samples("train", train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        metrics.update(_num_samples("eval", eval_dataset))
        if "eval_perplexity" in metrics:  # absent over zero tokens
            metrics["perplexity"] = metrics["eval_perplexity"]  # the key run_clm.py users look for
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if generation_args.do_generate_eval:
        logger.info("*** Generation quality ***")
        metrics = trainer.evaluate_generation(
            (
                example[text_column] if renderer is None else renderer.render(example, tokenizer).text
                for example in raw["validation"]
            ),
            prompt_length=generation_args.generate_prompt_length,
            max_new_tokens=generation_args.generate_max_new_tokens,
            max_samples=generation_args.generate_eval_samples,
        )
        trainer.log_metrics("generate", metrics)
        trainer.save_metrics("generate", metrics)

    card_kwargs = _card_kwargs(model_args, data_args)
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)


def _cache_teachers(
    model_args: ModelArguments,
    training_args: MultiTeacherDistillationConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset | IterableDataset | None,
    eval_dataset: Dataset | IterableDataset | None,
    parser: HfArgumentParser,
) -> dict[str, TeacherLogitsCache]:
    """The teachers' logits cache of each split in `<--teacher_logits_cache>/<split>`, written where missing."""
    caches = {}
    for split, dataset in (("train", train_dataset), ("validation", eval_dataset)):
        if dataset is None:
            continue
        if isinstance(dataset, IterableDataset):
            parser.error("--teacher_logits_cache needs the whole dataset on disk; it cannot be used with --streaming.")
        with training_args.main_process_first(desc=f"caching the teachers' logits on the {split} split"):
            try:
                caches[split] = cache_teacher_logits(
                    model_args.teacher_model_name_or_path,
                    dataset,
                    os.path.join(model_args.teacher_logits_cache, split),
                    k=model_args.teacher_logits_top_k,
                    tokenizer=tokenizer,
                    names=training_args.teacher_names,
                    batch_size=training_args.per_device_eval_batch_size,
                    teacher_dtype=training_args.teacher_dtype,
                    teacher_model_init_kwargs=training_args.teacher_model_init_kwargs,
                    device=training_args.device,
                    disable_tqdm=training_args.disable_tqdm or not training_args.should_log,
                )
            except StaleCacheError as err:
                parser.error(str(err))
    if not caches:
        parser.error("--teacher_logits_cache has no split to cache: give --train_file and/or --validation_file.")
    return caches


def _split(
    lm_datasets: DatasetDict | IterableDatasetDict,
    split: str,
    max_samples: int | None,
    block_size: int,
    parser: HfArgumentParser,
) -> Dataset | IterableDataset:
    """One split of blocks, cut to `max_samples`; a missing or empty split exits with an explanation."""
    flag = {"train": "--do_train", "validation": "--do_eval"}[split]
    if split not in lm_datasets:
        parser.error(f"{flag} needs a {split} split; give --{split}_file or a dataset that has one.")
    dataset = lm_datasets[split]
    if isinstance(dataset, IterableDataset):
        return dataset if max_samples is None else dataset.take(max_samples)
    if len(dataset) == 0:
        parser.error(
            f"The {split} data holds fewer than --block_size={block_size} tokens, so it makes no block; lower "
            "--block_size or give more text."
        )
    return dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))


def _num_samples(prefix: str, dataset: Dataset | IterableDataset) -> dict[str, int]:
    """`{<prefix>_samples: number of blocks}`, empty for a stream (of unknown length)."""
    return {} if isinstance(dataset, IterableDataset) else {f"{prefix}_samples": len(dataset)}


def _card_kwargs(model_args: ModelArguments, data_args: DataTrainingArguments) -> dict[str, Any]:
    """What the model card says about the student's origin and data, as `run_clm.py` passes it."""
    origin = model_args.model_name_or_path
    if model_args.student_from_teacher_layers:
        layers = model_args.student_from_teacher_layers
        kept = f"{layers[0]} of its layers" if len(layers) == 1 else f"its layers {layers}"
        origin = f"{model_args.teacher_model_name_or_path[0]}, cut to {kept}"
    kwargs: dict[str, Any] = {"finetuned_from": origin, "tasks": "text-generation"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name
    else:
        kwargs["dataset"] = os.path.basename(data_args.validation_file or data_args.train_file)
    return kwargs


if __name__ == "__main__":
    main()
