"""Every pytest run of this repository checks exercises strictly: a failing or unattempted check raises
(``AR_COURSE_STRICT_CHECKS=1``, see :mod:`ar_course.checks.core`). That is how nbval fails a solution notebook
whose check fails, and how the checks' own tests see the failures. A test that needs the learner's lenient
behaviour (Run All on a learner notebook) sets the variable to 0 itself."""

import os

os.environ["AR_COURSE_STRICT_CHECKS"] = "1"
