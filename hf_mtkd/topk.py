"""The former home of the top-k storage format, now `hf_mtkd.storage`: its names stay importable from here."""

from .storage import TAIL_LOG_PROB_FLOOR as TAIL_LOG_PROB_FLOOR
from .storage import SparseRows as SparseRows
from .storage import TeacherLogits as TeacherLogits
from .storage import TopKLogits as TopKLogits
from .storage import TopKLogProbs as TopKLogProbs
from .storage import take_rows as take_rows
