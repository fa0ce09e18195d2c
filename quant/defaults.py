"""Recipe defaults that the server's settings and the command line share: importable before torch is
(``q8chat serve`` reads its settings first, and sets inductor's cache directory before torch loads)."""

from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "q8chat"  # INT8 checkpoints, compiled steps, random models

CALIB_SAMPLES = 128  # calibration sequences
CALIB_LENGTH = 512  # tokens per calibration sequence
