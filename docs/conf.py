"""Sphinx configuration for the tornado-longconn docs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The repository root: the package and the benchmarks' chart module, from a checkout.
sys.path.insert(0, os.path.abspath(".."))

import tornado_longconn
from benchmarks import charts

# Bar charts of the committed benchmark results, drawn at every build.
charts.write_charts(Path(__file__).parent / "_generated" / "charts")

project = "tornado-longconn"
author = "tornado-longconn contributors"
copyright = "2026, tornado-longconn contributors"
release = tornado_longconn.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated", "demo", "examples", "**/node_modules"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
nitpicky = False

# No intersphinx: the docs build runs offline (CI has no network beyond package indexes).

html_theme = "furo"
html_title = "tornado-longconn"
