"""Every pytest run of this repository checks exercises strictly: a failing or unattempted check raises
(``AR_COURSE_STRICT_CHECKS=1``, see :mod:`ar_course.checks.core`). That is how nbval fails a solution notebook
whose check fails, and how the checks' own tests see the failures. A test that needs the learner's lenient
behaviour (Run All on a learner notebook) sets the variable to 0 itself.

``make test`` runs the tests in parallel processes (pytest-xdist, ``-n``): each worker then gets an equal share of
the cores for torch and for the notebook kernels it starts (``OMP_NUM_THREADS``), so two workers on two cores do
not oversubscribe them."""

import os

os.environ["AR_COURSE_STRICT_CHECKS"] = "1"
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
