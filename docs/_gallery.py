"""The gallery's command line for each example (sphinx-gallery's ``reset_argv``).

Each example runs with ``--quick`` (a tiny configuration: seconds, not
minutes) unless the environment sets ``FASTBN_GALLERY=full``, and writes its
PNG files into a temporary folder removed at exit: the gallery takes the
plots from the figures the example leaves open.
"""

import atexit
import os
import shutil
import tempfile

_OUT = tempfile.mkdtemp(prefix="fastbn-gallery-")
atexit.register(shutil.rmtree, _OUT, True)


def reset_argv(gallery_conf, script_vars):
    """The arguments after the script's name: ``--quick`` and ``--out`` a temporary folder."""
    quick = [] if os.environ.get("FASTBN_GALLERY") == "full" else ["--quick"]
    return [*quick, "--out", _OUT]
