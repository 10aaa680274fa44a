"""Upstream lm-eval task functions, re-exported (`!function` resolves only next to the YAML that names it), and
the one adapter the local files need."""

from lm_eval.tasks.aime.utils import process_results as aime_process_results  # noqa: F401
from lm_eval.tasks.hendrycks_math.utils import process_docs as math_process_docs  # noqa: F401
from lm_eval.tasks.hendrycks_math.utils import process_results as math_process_results  # noqa: F401


def aime_process_docs(dataset):
    """The local AIME files write answers as strings with leading zeros ("025"); upstream's hub copies hold
    integers, and its string comparison would count "25" wrong against "025"."""
    return dataset.map(lambda doc: {"answer": str(int(doc["answer"]))})
