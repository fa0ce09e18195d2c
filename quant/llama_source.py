"""llama-cpp-python's source distribution, fetched once from the package index pip reaches and kept under the
cache: it ships llama.cpp's test vocabularies (the LLaMA SentencePiece one among them) and its
``convert_hf_to_gguf.py``, which the installed wheel lacks."""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = "0.3.36"  # pyproject.toml's llamacpp extra
NAME = f"llama_cpp_python-{VERSION}"


class SourceUnavailable(RuntimeError):
    """The source distribution could not be fetched; the message says why and what to run."""


def llama_cpp_source(cache_dir: Path) -> Path:
    """The unpacked source tree (its ``vendor/llama.cpp``), downloaded by pip on first use."""
    root = Path(cache_dir).expanduser() / NAME
    if (root / "vendor" / "llama.cpp").is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".sdist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += [f"llama-cpp-python=={VERSION}", "--dest", tmp]
        log.info("fetching llama-cpp-python %s's source distribution (76 MB) with pip", VERSION)
        done = subprocess.run(command, capture_output=True, text=True)
        archive = Path(tmp) / f"{NAME}.tar.gz"
        if done.returncode != 0 or not archive.is_file():
            reason = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise SourceUnavailable(f"pip could not download llama-cpp-python=={VERSION}'s sdist: {reason}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / NAME).rename(root)
    return root
