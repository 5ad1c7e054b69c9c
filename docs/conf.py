"""Sphinx configuration of fastbn's documentation site.

Build: ``pip install -e ".[docs]"``, then ``sphinx-build -W --keep-going -b html docs OUT``.
The API pages are generated from the docstrings (autosummary, numpydoc), the
gallery from ``examples/`` (sphinx-gallery, each example run with ``--quick``
unless ``FASTBN_GALLERY=full``), the user guide is MyST Markdown in ``guide/``.
"""

import inspect
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))  # _gallery.py, which sphinx-gallery imports by name

import fastbn  # noqa: E402

project = "fastbn"
author = "the fastbn authors"
copyright = "the fastbn authors"
release = fastbn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "auto_examples/*.ipynb"]
# `name` in a docstring links to the object when Sphinx knows it, else it is
# set in italics (autosummary's role): the docstrings name private helpers too.
default_role = "autolink"

# API reference: one generated page per public name (the lists are in api/*.rst).
autosummary_generate = True
autosummary_imported_members = False
autodoc_typehints = "none"  # numpydoc's Parameters sections give the types
autodoc_typehints_format = "fully-qualified"  # "Bases:" names torch's classes in full
autodoc_member_order = "bysource"
numpydoc_show_class_members = False  # the class template lists the members
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = f"fastbn {release}"
html_static_path = ["_static"]
html_css_files = ["fastbn.css"]
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "secondary_sidebar_items": ["page-toc", "sourcelink"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_sidebars = {"index": [], "changelog": []}
html_show_sourcelink = True

# The gallery: examples/*.py, run at build time with their quick settings.
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    # Run every example but the distributed one, which starts processes of its
    # own (torchrun or torch.multiprocessing): shown, not run.
    "filename_pattern": r"/(?!ddp_syncbn)[a-z][a-z_]*\.py$",
    "ignore_pattern": r"_common\.py$",
    "reset_argv": "_gallery.reset_argv",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "plot_gallery": "True",
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "capture_repr": (),
    "show_memory": False,
    "min_reported_time": 1,
    "abort_on_example_error": True,
}
if os.environ.get("FASTBN_GALLERY") == "off":  # the text and code only, nothing run
    sphinx_gallery_conf["plot_gallery"] = "False"


def public_bases(app, name, obj, options, bases):
    """Show a class's bases as public names: an internal fastbn base gives way to its own.

    fastbn.torch's modules derive from a private mixin and torch's classes; their
    pages say "Bases: torch.nn.BatchNorm2d" rather than name the mixin.
    """
    import fastbn.nn
    import fastbn.torch

    public_names = {*fastbn.__all__, *fastbn.nn.__all__, *fastbn.torch.__all__}
    shown, pending = [], list(bases)
    while pending:
        base = pending.pop(0)
        internal = base.__module__.startswith("fastbn") and base.__name__ not in public_names
        if base is object or internal:
            pending[:0] = [b for b in base.__bases__ if b is not object]
        elif base not in shown:
            shown.append(base)
    bases[:] = shown


def shared_parameters(app, what, name, obj, options, lines):
    """The BatchRenorm1d/2d/3d pages: their docstrings defer to BatchRenormBase's sections.

    The base class is not public, so its Parameters and Attributes (renorm_clipping,
    rmax, rmin, dmax) are appended to each public subclass's docstring, before
    numpydoc reads it.
    """
    if what != "class" or not re.fullmatch(r"fastbn\.torch\.BatchRenorm[123]d", name):
        return
    from fastbn.torch.renorm import BatchRenormBase

    base = inspect.cleandoc(BatchRenormBase.__doc__).splitlines()
    start = base.index("Parameters")
    lines.extend(["", *base[start:]])


def setup(app):
    app.connect("autodoc-process-bases", public_bases)
    # Before numpydoc (priority 500) parses the docstring into sections.
    app.connect("autodoc-process-docstring", shared_parameters, priority=400)
