"""Settings for every test, including the notebooks nbval runs: kernels inherit this
environment. No progress bars, static explorers, a non-interactive matplotlib backend."""

import os

os.environ.setdefault("DEPTHLAB_QUIET", "1")
os.environ.setdefault("DEPTHLAB_STATIC", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
