"""`MultiTeacherDistillationConfig`: every knob of multi-teacher distillation, as `TrainingArguments` fields."""

from __future__ import annotations

import copy
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .alignment import FEATURE_LOSSES
from .cross_tokenizer import CROSS_TOKENIZER_LOSSES, CROSS_TOKENIZER_MODES
from .distributed import DEEPSPEED_CONFIGS, resolve_deepspeed_config
from .divergences import DEFAULT_BETA, DEFAULT_SKEW_ALPHA, FUSED_DIVERGENCES, SKEWED
from .dtypes import DTYPE_CHOICES
from .fusion import FUSIONS
from .heads import LOGIT_FREE_MODES
from .redaction import redact
from .settings import DistillationSettings
from .weighting import DEFAULT_WEIGHTING, GRANULARITIES, WEIGHTINGS


@dataclass
class MultiTeacherDistillationConfig(TrainingArguments):
    r"""
    Configuration for [`MultiTeacherDistillationTrainer`].

    The training loss is `alpha_ce * L_ce + alpha_kd * L_kd + alpha_feat * L_feat` (see `hf_mtkd.losses`). All fields
    of `transformers.TrainingArguments` are available too, so `HfArgumentParser` turns this class into the usual
    command-line flags plus the distillation ones below, by section (each field's help says more):

    > The loss

    - `temperature`: tau of the tempered distributions in the KD term.
    - `alpha_ce`, `alpha_kd`, `alpha_feat`: the weights of the three terms.
    - `fusion`: how the weighted teachers form one target (`probability` or `logit`).
    - `divergence`, with `beta` and `skew_alpha`: how the student is compared with that target (forward KL,
      reverse KL, generalized JSD, skew KLs; see `hf_mtkd.divergences`).
    - `loss_chunk_size`: positions the loss reads at once (memory only; the loss does not depend on it).
    - `logit_free`: the loss from final hidden states and output heads, without `[batch, length, vocab]` logits
      (on by default where it applies).

    > Teacher weighting

    - `teacher_weighting`: the strategy (`entropy`, `static`, label-aware ones; see `hf_mtkd.weighting`).
    - `teacher_weights`: the static prior over teachers; `min_weight`: the floor of every weight.
    - `entropy_temperature`, `label_temperature`, `posterior_decay`: the strategies' hyperparameters.
    - `weighting_granularity`: scores pooled per token, sequence or batch.
    - `prompt_evidence`, `prompt_temperature`: whether, and how much, the teachers' likelihood of a document's prompt
      weighs them on it.
    - `routing_column`: the dataset column that routes rows to teachers.

    > Feature alignment

    - `feature_loss`, `normalize_feature_targets`, `feature_layers`: the distance, the target normalisation and the
      layer pairs.
    - `projector_learning_rate`, `push_projector`: the projections' learning rate, and whether they go to the Hub.

    > Teachers

    - `teacher_dtype`, `teacher_names`, `teacher_model_init_kwargs`: how teachers given by name are loaded and named.
    - `cross_tokenizer`, `cross_tokenizer_loss`, `cross_tokenizer_chains`, `cross_tokenizer_prefix_mass`,
      `cross_tokenizer_max_length`: teachers on other tokenizers.

    > Instruction and chat data (see `hf_mtkd.chat_data`)

    - `completion_only_loss`, `assistant_only_loss`: which tokens carry the loss.
    - `chat_template_path`, `teacher_chat_template_path`: the chat templates of the student and of each teacher.
    - `packing`, `max_length`: packed rows and their length.

    > On-policy distillation (see docs/on_policy.md)

    - `lmbda`: the share of batches whose completions the student generates (0: off-policy, the data as given).
    - `seq_kd`, `seq_kd_teacher`: a teacher generates the completions of the other batches, and which one.
    - `max_new_tokens`, `generation_temperature`, `generation_top_k`, `generation_top_p`: how completions are sampled.
    - `disable_dropout`: no dropout in the student (GKD's default).
    - `ds3_gather_for_generation`: under DeepSpeed ZeRO-3, the writer's weights gathered once per generation.

    > Scale

    - `deepspeed`: a DeepSpeed config, or the name of one shipped with hf_mtkd (teachers are sharded under ZeRO-3).
    """

    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature tau applied to student and teacher logits in the KD term (> 0)."},
    )
    alpha_ce: float = field(
        default=0.5,
        metadata={"help": "Weight of the cross-entropy loss on the true next tokens (>= 0)."},
    )
    alpha_kd: float = field(
        default=0.5,
        metadata={"help": "Weight of the distillation loss tau^2 * KL(fused teachers || student) (>= 0)."},
    )
    alpha_feat: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the feature-alignment loss between projected student hidden states and teacher "
            "hidden states (>= 0). 0 disables it: no projections are created and teachers return no hidden states."
        },
    )
    teacher_weighting: str = field(
        default=DEFAULT_WEIGHTING,
        metadata={
            "help": "How teachers are weighted at each position: 'posterior' (the default: w_k ~ prior_k * "
            "exp(sum_{s<=t} posterior_decay^(t-s) log p_k(y_{s+1}) / label_temperature): the teacher that has "
            "predicted this document best so far leads), 'entropy' (a more certain teacher, with lower tempered "
            "entropy, gets more weight: w_k ~ prior_k * exp(-H_k / entropy_temperature); it trusts a confidently "
            "wrong teacher), 'static' (w_k = prior_k), 'correctness' (w_k ~ prior_k * p_k(true next "
            "token)^(1/label_temperature)), 'entropy+posterior' "
            "(the product of both factors) or 'likelihood' (w_k ~ prior_k * p_k(document)^(1/label_temperature), "
            "the same at every position of a row or packed document: routes each document to the teacher that "
            "predicts it best).",
            "choices": list(WEIGHTINGS),
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Static prior over teachers, one non-negative number per teacher (normalised to sum to 1). "
            "Default: uniform."
        },
    )
    entropy_temperature: float = field(
        default=1.0,
        metadata={
            "help": "gamma in the entropy weighting exp(-H_k / gamma) (> 0). Small values route each position "
            "to the most certain teacher; large values approach the static prior."
        },
    )
    label_temperature: float = field(
        default=1.0,
        metadata={
            "help": "gamma of the label-aware weightings ('correctness', 'posterior', 'entropy+posterior', "
            "'likelihood') (> 0): smaller values follow the teacher that predicts the true tokens best more sharply. "
            "'likelihood' sums log-probabilities over a whole document, so its gamma is on that scale (e.g. 16 for "
            "64-token rows)."
        },
    )
    posterior_decay: float = field(
        default=0.9,
        metadata={
            "help": "lambda in (0, 1], the forgetting factor of the 'posterior' weighting: how much of a teacher's "
            "track record on earlier tokens of the document carries to the next one (1 = never forget)."
        },
    )
    prompt_evidence: bool = field(
        default=False,
        metadata={
            "help": "Let each teacher's likelihood of a document's prompt (its tokens without a label: a chat's "
            "user turns, the prompt an on-policy student continues) weigh it on the whole document: "
            "w_k ~ prior_k * p_k(prompt)^(1/prompt_temperature) * exp(score_k), with any teacher_weighting. The "
            "teachers' heads then also run at the prompt positions (a teacher-logits cache holds them already); a "
            "cross-tokenizer teacher reads the prompt in its own tokens, and then every teacher is scored on the "
            "prompt inside the messages' contents only (not the chat templates' markup)."
        },
    )
    prompt_temperature: float = field(
        default=1.0,
        metadata={
            "help": "gamma_p > 0 of `prompt_evidence`: the prompt's log-likelihood is divided by it (1 = the "
            "Bayesian posterior of which teacher wrote the prompt; larger = softer)."
        },
    )
    routing_column: str | None = field(
        default="teacher_ids",
        metadata={
            "help": "Dataset column that routes rows to teachers (used when the train or eval dataset has it; None "
            "disables routing). Each row's value is a teacher index (an integer) or name, a list of them (uniform "
            "over those teachers) or one non-negative float weight per teacher (normalised); a missing value is "
            "uniform. This per-row prior r multiplies the weights: w_k ~ prior_k * r_k * exp(score_k), so a teacher "
            "with r_k = 0 gets no weight in that row; with teacher_weighting='static' it is routing by hand."
        },
    )
    min_weight: float = field(
        default=0.0,
        metadata={
            "help": "Floor on every teacher's weight, in [0, 1/K): w <- min_weight + (1 - K * min_weight) * w, so "
            "no teacher is silenced entirely."
        },
    )
    weighting_granularity: str = field(
        default="token",
        metadata={
            "help": "Where teacher entropies are pooled before weighting: 'token' (each position), 'sequence' "
            "(mean over a sequence's valid positions) or 'batch' (mean over the micro-batch on this device).",
            "choices": list(GRANULARITIES),
        },
    )
    fusion: str = field(
        default="probability",
        metadata={
            "help": "How weighted teachers form one target: 'probability' (p = sum_k w_k softmax(z_k / tau)) or "
            "'logit' (p = softmax(sum_k w_k z_k / tau)).",
            "choices": list(FUSIONS),
        },
    )
    divergence: str | None = field(
        default=None,
        metadata={
            "help": "How the student's tempered distribution q is compared with the fused target p: 'forward_kl' "
            "(KL(p || q), mass-covering), 'reverse_kl' (KL(q || p), mode-seeking), 'jsd' (GKD's generalized "
            "Jensen-Shannon divergence with `beta`), 'skew_kl' (KL(p || a p + (1 - a) q)) or 'skew_reverse_kl' "
            "(KL(q || (1 - a) p + a q)), a = `skew_alpha`. None: 'jsd' when `beta` is set (as in TRL's GKD), else "
            "'forward_kl'. The KD term is tau^2 times its mean over the positions.",
            "choices": list(FUSED_DIVERGENCES),
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "Interpolation beta of the generalized JSD, in [0, 1], as in TRL's GKD: "
            "beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; 0 is the forward KL, 1 the "
            f"reverse KL. Setting it selects `divergence='jsd'`; None with 'jsd': {DEFAULT_BETA}."
        },
    )
    skew_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Skew alpha of 'skew_kl' and 'skew_reverse_kl' (DistiLLM), in [0, 1); 0 gives the plain KLs. "
            f"None: {DEFAULT_SKEW_ALPHA}."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Positions whose next-token distributions the loss processes at once. The loss does not depend "
            "on it; its extra memory is O(loss_chunk_size x vocab x teachers) instead of O(batch x length x vocab x "
            "teachers). None: 4M / vocab positions (16 MiB per [chunk, vocab] float32 tensor; 32 at a 128k "
            "vocabulary), which keeps the chunks in the allocator's cache."
        },
    )
    logit_free: str = field(
        default="auto",
        metadata={
            "help": "Compute the loss from final hidden states and output heads, a chunk of positions at a time, "
            "instead of [batch, length, vocab] logits: no full-vocabulary logits exist for the student or any "
            "teacher, and teachers' heads run at the positions with a next-token label only. 'auto' (where it "
            "applies; a model with a soft-capped, scaled or non-linear head falls back to its logits, and the 'uld' "
            "divergence keeps the student on its logits, with the reason logged once), 'always' (refuse where it "
            "does not apply) or 'never'. The loss is the same either way.",
            "choices": list(LOGIT_FREE_MODES),
        },
    )
    feature_loss: str = field(
        default="mse",
        metadata={
            "help": "Distance between projected student and teacher hidden states: 'mse' (mean squared error "
            "over the hidden dimension) or 'cosine' (1 - cosine similarity).",
            "choices": list(FEATURE_LOSSES),
        },
    )
    normalize_feature_targets: bool = field(
        default=True,
        metadata={
            "help": "Standardise each teacher hidden state over its hidden dimension (LayerNorm without affine) "
            "before the feature loss. Raw hidden states of different models and layers differ in scale by orders "
            "of magnitude, which would let the largest one dominate the loss; set False for the raw distance."
        },
    )
    feature_layers: list | str | None = field(
        default=None,
        metadata={
            "help": "Hidden-state pairs to align, one list per teacher of [student_layer, teacher_layer] pairs, "
            "as a list or a JSON string, e.g. '[[[2, 6], [4, 12]], [[4, 8]]]'. Layer i is hidden_states[i] "
            "(0 = embeddings, negative indices count from the end). Default: the student's middle and last "
            "layers, each paired with the teacher layer at the same relative depth."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the teachers run in. 'auto' keeps a given model's dtype and loads a checkpoint in "
            "its stored dtype; 'bfloat16'/'float16' halve teacher memory.",
            "choices": list(DTYPE_CHOICES),
        },
    )
    teacher_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names used for the teachers in logs (teacher_weight/<name>) and model cards. Default: "
            "derived from each teacher's path or model type."
        },
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments (a dict or a JSON string) for `from_pretrained` when teachers are given as "
            'names or paths, e.g. \'{"revision": "main", "attn_implementation": "sdpa"}\'.'
        },
    )
    cross_tokenizer: str = field(
        default="auto",
        metadata={
            "help": "Teachers with another tokenizer than the student's: 'auto' distills a teacher whose tokenizer "
            "(or vocabulary size) differs in cross-tokenizer mode: every model tokenizes the raw text itself, "
            "positions are aligned by character offsets and the teacher's next-token distribution is mapped onto "
            "the student's vocabulary (the dataset must then keep a 'text' column). 'always' uses that mode for "
            "every teacher, 'never' for none (a teacher with another tokenizer is then an error).",
            "choices": list(CROSS_TOKENIZER_MODES),
        },
    )
    cross_tokenizer_loss: str = field(
        default="kl",
        metadata={
            "help": "Divergence of the KD term when some teacher runs in cross-tokenizer mode: 'kl' (`divergence` "
            "on the student's vocabulary, teachers mapped onto it) or 'uld' (Universal Logit Distillation: the "
            "weighted L1 distance between sorted teacher and student probabilities, which needs no shared "
            "vocabulary; for teachers whose vocabularies barely overlap). 'uld' applies to every teacher.",
            "choices": list(CROSS_TOKENIZER_LOSSES),
        },
    )
    cross_tokenizer_chains: bool = field(
        default=True,
        metadata={
            "help": "Cross-tokenizer mode: where a teacher spells the student's next token as several tokens of its "
            "own, its probability of that whole token (chained over its own tokens, read from its forward pass) "
            "moves onto it from the student token that only begins it. False: the vocabulary map alone (a teacher "
            "with shorter tokens then gives the student's token little mass)."
        },
    )
    cross_tokenizer_prefix_mass: bool = field(
        default=False,
        metadata={
            "help": "Cross-tokenizer mode: a teacher token with no student token of the same text is left out, its "
            "probability renormalised away like an unmapped token's (False: the target holds the exact twins and "
            "the chained probability of the student's token), or sends its probability to the student token that "
            "begins its text (True, which teaches the student short tokens it would not use)."
        },
    )
    cross_tokenizer_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Cross-tokenizer mode: the default collator keeps at most this many student tokens per text "
            "(the teachers get the same character span). None: no truncation."
        },
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Prompt/completion data: only the completion's tokens carry loss (cross-entropy, KD and feature "
            "terms), so prompt positions cost no KD work. False: every token does."
        },
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Conversational data (a 'messages' column): only the assistant turns (with their end-of-turn "
            "markers) carry loss. Unlike TRL's SFT default (False), on by default: a student distils the assistant. "
            "False: every token of the rendered conversation does."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "Chat template for the student's tokenizer (saved with the student): a .jinja file, or a "
            "tokenizer directory or Hub id whose template is taken. Needed when the data is conversational and the "
            "tokenizer has no template; teachers on the student's tokenizer read its rendering."
        },
    )
    teacher_chat_template_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Cross-tokenizer teachers: one chat template per teacher (as for chat_template_path, or 'own' "
            "to keep the teacher tokenizer's own), in teacher order. Each such teacher renders every conversation "
            "with its own template."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack short tokenized examples (plain text, prompt/completion or conversations) into rows of "
            "max_length tokens, position_ids restarting at 0 for each: attention and the 'posterior' weighting's "
            "running sums stay within an example. Teachers on the student's tokenizer only."
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompt/completion, chat and packed data tokenized by the trainer: tokens kept per example (the "
            "rest is cut), and the length of a packed row. None: no cut (packing needs a length)."
        },
    )
    projector_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the feature-alignment projections (their own optimizer param group). "
            "Default: learning_rate."
        },
    )

    push_projector: bool = field(
        default=False,
        metadata={
            "help": "Also upload the feature-alignment projections (mtkd_projector.safetensors) with `push_to_hub`. "
            "They are only needed to continue distillation, not to use the student, so by default the Hub repo gets "
            "the plain student. Checkpoints pushed with hub_strategy='checkpoint' keep them (resuming needs them)."
        },
    )

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy share, in [0, 1] (GKD's lmbda): each training micro-batch is, with this probability "
            "(a draw seeded by seed, step and micro-batch), replaced by the student's own completions of its prompts, "
            "sampled with generation_temperature; every teacher scores them and the loss covers the generated tokens "
            "only. 0: off-policy, the data as given. Needs prompts: prompt/completion or conversational data (or a "
            "dataset of prompts alone with lmbda=1 or seq_kd)."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD (GKD's seq_kd): the batches the student does not generate get completions "
            "generated by the teacher `seq_kd_teacher` instead of the dataset's, which all teachers then score."
        },
    )
    seq_kd_teacher: str | None = field(
        default=None,
        metadata={
            "help": "The teacher that generates for seq_kd: its name or index. It must share the student's "
            "tokenizer. Default: the one with the largest static prior teacher_weights (the first on ties): the "
            "prior is the stated trust in each teacher, while the dynamic weights are per token and unknown before "
            "the sequence exists."
        },
    )
    max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "Tokens generated at most per completion on on-policy and seq_kd batches (>= 1); generation "
            "stops earlier at the tokenizer's EOS."
        },
    )
    generation_temperature: float | None = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of on-policy and seq_kd completions (> 0). 1.0: the writer's own "
            "distribution, the text it would write. None: the KD `temperature`, one temperature for both as in "
            "TRL's GKD (with this package's KD default of 2.0 that samples much flatter, noisier text)."
        },
    )
    generation_top_k: int = field(
        default=0,
        metadata={"help": "Sample among the k most likely tokens only (>= 0); 0: the whole vocabulary, as GKD."},
    )
    generation_top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: the smallest set of tokens with this much probability, in (0, 1]."},
    )
    disable_dropout: bool = field(
        default=False,
        metadata={
            "help": "Set every dropout probability of the student to 0 for training (GKD's disable_dropout, on by "
            "default there). Generation always runs without dropout (eval mode); teachers always do."
        },
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "DeepSpeed ZeRO-3: gather the partitioned weights of the model that generates (the student, or "
            "the seq_kd teacher) once for each generated micro-batch, so that every new token is a local forward "
            "pass (TRL's setting of the same name). Each process then holds the whole writer for a moment. False: "
            "gather each layer again at every token (much slower), for a writer too large to hold whole."
        },
    )

    deepspeed: dict | str | None = field(
        default=None,
        metadata={
            "help": "Enable DeepSpeed: a path to a JSON config, a dict, or the short name of a config shipped with "
            f"hf_mtkd: {', '.join(DEEPSPEED_CONFIGS)}. Under ZeRO-3 the teachers are partitioned across "
            "processes like the student; under ZeRO-2 they are replicated."
        },
    )

    def __post_init__(self) -> None:
        self.deepspeed = resolve_deepspeed_config(self.deepspeed)  # before TrainingArguments reads it
        super().__post_init__()
        for name in ("alpha_ce", "alpha_kd", "alpha_feat"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.alpha_ce == self.alpha_kd == self.alpha_feat == 0:
            raise ValueError("`alpha_ce`, `alpha_kd` and `alpha_feat` are all 0: there is nothing to train on.")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        for name in ("entropy_temperature", "label_temperature", "prompt_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        if not 0 < self.posterior_decay <= 1:
            raise ValueError(f"`posterior_decay` must be in (0, 1], got {self.posterior_decay}.")
        if not 0 <= self.min_weight < 1:
            raise ValueError(f"`min_weight` must be in [0, 1/K), got {self.min_weight}.")
        for name, choices in (
            ("teacher_weighting", WEIGHTINGS),
            ("weighting_granularity", GRANULARITIES),
            ("fusion", FUSIONS),
            ("feature_loss", FEATURE_LOSSES),
            ("teacher_dtype", DTYPE_CHOICES),
            ("cross_tokenizer", CROSS_TOKENIZER_MODES),
            ("cross_tokenizer_loss", CROSS_TOKENIZER_LOSSES),
            ("logit_free", LOGIT_FREE_MODES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"Unknown `{name}` {getattr(self, name)!r}; choose one of {list(choices)}.")
        if self.teacher_weights is not None:
            if isinstance(self.teacher_weights, str) or not all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) for w in self.teacher_weights
            ):
                raise ValueError(
                    f"`teacher_weights` must be a list of numbers, one per teacher (e.g. [0.5, 0.5]), got "
                    f"{self.teacher_weights!r}."
                )
            if any(w < 0 for w in self.teacher_weights) or sum(self.teacher_weights) <= 0:
                raise ValueError(
                    f"`teacher_weights` must be non-negative with a positive sum, got {self.teacher_weights}."
                )
        if self.label_smoothing_factor > 0:
            raise ValueError(
                "`label_smoothing_factor` is not supported by distillation: the teachers' soft targets already play "
                "that role. Set it to 0 (and raise `alpha_kd` for softer targets)."
            )
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"`loss_chunk_size` must be a positive number of positions, got {self.loss_chunk_size}.")
        if self.cross_tokenizer_max_length is not None and self.cross_tokenizer_max_length < 2:
            raise ValueError(
                f"`cross_tokenizer_max_length` must be at least 2 tokens, got {self.cross_tokenizer_max_length}."
            )
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"`max_length` must be at least 2 tokens, got {self.max_length}.")
        if self.projector_learning_rate is not None and self.projector_learning_rate < 0:
            raise ValueError(f"`projector_learning_rate` must be >= 0, got {self.projector_learning_rate}.")
        self._resolve_divergence()
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"`lmbda` (the share of on-policy batches) must be in [0, 1], got {self.lmbda}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1, got {self.max_new_tokens}.")
        if self.generation_temperature is not None and self.generation_temperature <= 0:
            raise ValueError(
                f"`generation_temperature` must be > 0, got {self.generation_temperature} (None: `temperature`)."
            )
        if self.generation_top_k < 0:
            raise ValueError(f"`generation_top_k` must be >= 0 (0: no top-k cut), got {self.generation_top_k}.")
        if not 0 < self.generation_top_p <= 1:
            raise ValueError(f"`generation_top_p` must be in (0, 1], got {self.generation_top_p}.")
        if self.packing and (self.lmbda > 0 or self.seq_kd):
            raise ValueError(
                "`packing` cannot be combined with on-policy distillation (lmbda > 0 or seq_kd): generated batches "
                "hold one prompt and its completion per row. Set packing=False."
            )
        if self.seq_kd_teacher is not None and not self.seq_kd:
            raise ValueError(
                f"`seq_kd_teacher={self.seq_kd_teacher!r}` has no effect without `seq_kd`: set seq_kd=True for it "
                "to write the completions, or drop it."
            )
        self.feature_layers = _parse_feature_layers(self.feature_layers)
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)

    def _resolve_divergence(self) -> None:
        """Check `divergence`, `beta` and `skew_alpha`; an unset `divergence` becomes `jsd` with `beta`, as in GKD."""
        if self.divergence is None:
            self.divergence = "forward_kl" if self.beta is None else "jsd"
        if self.divergence not in FUSED_DIVERGENCES:
            raise ValueError(
                f"Unknown `divergence` {self.divergence!r}; choose one of {list(FUSED_DIVERGENCES)} (ULD is "
                "`cross_tokenizer_loss='uld'`)."
            )
        for name, owners in (("beta", ("jsd",)), ("skew_alpha", SKEWED)):
            if getattr(self, name) is not None and self.divergence not in owners:
                raise ValueError(
                    f"`{name}` has no effect with `divergence={self.divergence!r}` (it belongs to "
                    f"{' and '.join(owners)}): drop it, or set `divergence` to {owners[0]!r}."
                )
        DistillationSettings.from_config(self)  # the ranges of `beta` and `skew_alpha`

    def check_num_teachers(self, num_teachers: int) -> None:
        """Raise a clear error when a per-teacher setting does not fit the number of teachers."""
        if self.min_weight * num_teachers >= 1:
            raise ValueError(
                f"`min_weight` {self.min_weight} is too large for {num_teachers} teachers: it must be below "
                f"1/{num_teachers} so the weights can still sum to 1."
            )
        for name in ("teacher_weights", "teacher_names", "feature_layers", "teacher_chat_template_path"):
            value = getattr(self, name)
            if value is not None and len(value) != num_teachers:
                raise ValueError(
                    f"`{name}` has {len(value)} entries but there are {num_teachers} teachers: give exactly one "
                    "entry per teacher, in the order of `teachers=`."
                )

    # ---- no secret in what is written: logs, reports, training_args.bin (see `hf_mtkd.redaction`) ----

    def to_dict(self) -> dict[str, Any]:
        """`TrainingArguments.to_dict` (what reports and logs show) with every secret redacted, nested ones too."""
        return redact(super().to_dict())

    def __str__(self) -> str:
        fields_as_text = "".join(f"{key}={value},\n" for key, value in sorted(self.to_dict().items()))
        return f"{type(self).__name__}(\n{fields_as_text})"

    __repr__ = __str__

    def __getstate__(self) -> dict[str, Any]:
        """What pickling (`torch.save(args)`, i.e. `training_args.bin`) stores: the fields with secrets redacted."""
        return redact(dict(self.__dict__))

    def __copy__(self) -> MultiTeacherDistillationConfig:
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)  # an in-memory copy keeps the secrets the run needs
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> MultiTeacherDistillationConfig:
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied


def _parse_feature_layers(value: Any) -> list[list[tuple[int, int]]] | None:
    """Normalise `feature_layers` (a list or its JSON string) into one list of (student, teacher) pairs per teacher."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"`feature_layers` is not valid JSON ({err}): {value!r}.") from None
    example = "e.g. [[[2, 6], [4, 12]], [[4, 8]]] for two teachers"
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"`feature_layers` must be a list with one list of pairs per teacher, {example}.")
    parsed = []
    for teacher_pairs in value:
        pairs = []
        for pair in teacher_pairs:
            if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
                raise ValueError(
                    f"`feature_layers` entry {pair!r} is not a [student_layer, teacher_layer] pair of integers, "
                    f"{example}."
                )
            pairs.append((pair[0], pair[1]))
        parsed.append(pairs)
    return parsed
