"""pytest setup of the Python tests: the package from python/ (or installed) and the library from RINGATTN_LIBRARY."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
if "RINGATTN_LIBRARY" in os.environ:  # a build tree: use the sources, not an installed copy
    sys.path.insert(0, os.path.join(ROOT, "python"))
