"""hf_mtkd: multi-teacher knowledge distillation of language models, as a drop-in `transformers.Trainer`."""

from .alignment import FeatureProjector
from .chat_data import CompletionCollator, ExampleRenderer
from .config import MultiTeacherDistillationConfig
from .cross_tokenizer import MultiTokenizerCollator, VocabularyMap, align_positions
from .logit_free import HeadLogits
from .losses import (
    DistillationLoss,
    causal_lm_loss,
    compute_teacher_weights,
    feature_alignment_loss,
    multi_teacher_kd,
    multi_teacher_kd_loss,
    universal_logit_distillation_loss,
)
from .pruning import student_from_teacher
from .settings import DistillationSettings
from .sources import TeacherSource
from .storage import TopKLogits, TopKLogProbs
from .teacher_cache import (
    StaleCacheError,
    TeacherCacheCollator,
    TeacherLogitsCache,
    cache_teacher_logits,
    load_teacher_cache,
)
from .trainer import MultiTeacherDistillationTrainer
from .version import __version__
from .weighting import WEIGHTINGS

__all__ = [
    "WEIGHTINGS",
    "CompletionCollator",
    "DistillationLoss",
    "DistillationSettings",
    "ExampleRenderer",
    "FeatureProjector",
    "HeadLogits",
    "MultiTeacherDistillationConfig",
    "MultiTeacherDistillationTrainer",
    "MultiTokenizerCollator",
    "StaleCacheError",
    "TeacherCacheCollator",
    "TeacherLogitsCache",
    "TeacherSource",
    "TopKLogProbs",
    "TopKLogits",
    "VocabularyMap",
    "__version__",
    "align_positions",
    "cache_teacher_logits",
    "causal_lm_loss",
    "compute_teacher_weights",
    "feature_alignment_loss",
    "load_teacher_cache",
    "multi_teacher_kd",
    "multi_teacher_kd_loss",
    "student_from_teacher",
    "universal_logit_distillation_loss",
]
