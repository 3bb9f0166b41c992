"""animfs: a shared DICOM archive in two object stores, served read-only as plain files."""

import os

# numpy does animfs's byte work (the shuffle filter) element by element and never calls
# BLAS, but the OpenBLAS that numpy's wheels bundle starts a thread per core when numpy
# is imported and keeps it spinning for a while: 0.1 s of CPU in every process (the
# mount, each of its unpackers, every command), half of what importing numpy costs, on
# the cores a mount that has just started needs for its first requests.  A value set
# in the environment is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
