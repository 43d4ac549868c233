"""transformers' model classes imported without the scikit-learn import they do not need here.

The first model class a process loads imports `transformers.generation.candidate_generator`,
which imports scikit-learn (and with it part of SciPy) whenever scikit-learn is installed, as it
is here (the built-in digits data and MLflow need it), for one feature: the adaptive
draft-confidence threshold of assisted generation, which Temper never runs. That import is ~3 s
of CPU in every process that loads a Hugging Face model: each Ray Train worker, Serve replica
and CLI process (a tiny BERT built in a fresh process: 12.2 CPU-s with it, 9.8 without).

`lean_transformers()` tells transformers scikit-learn is absent, before that module loads. The
only other readers of that flag in transformers 4.x are the GLUE/XNLI metric helpers in
`transformers.data.metrics`, which nothing here calls.
"""

from __future__ import annotations

import sys


def lean_transformers() -> None:
    """Call before importing a transformers model class or peft (which imports them)."""
    if "transformers.generation.candidate_generator" in sys.modules:
        return  # loaded already: the scikit-learn import this would save has happened
    from transformers.utils import import_utils

    if hasattr(import_utils, "_sklearn_available"):
        import_utils._sklearn_available = False
