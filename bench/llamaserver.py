"""llama.cpp's own HTTP server, ``llama-server``, as the served competitor of ``q8chat bench --concurrency``:
its parallel slots decode together in one batch, as q8chat's ``--max-batch`` does.

It is built once per cache, for the CPU it runs on (``GGML_NATIVE``), from the llama-cpp-python source tree
that q8chat already fetches (``quant.llama_source``): the same llama.cpp as the in-process competitor. It
needs cmake and a C++ compiler, and takes minutes on few cores. On a CPU that advertises AMX it runs with
``--no-repack``, for the reason ``bench.llamacpp`` gives.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from bench.llamacpp import LlamaCppUnavailable
from quant.kernels import cpu_class, cpu_flags
from quant.llama_source import VERSION, SourceUnavailable, llama_cpp_source

log = logging.getLogger(__name__)

NAME = "llama.cpp-server"


def binary(cache_dir: Path) -> Path:
    """``llama-server`` built for this CPU under ``cache_dir``, building it first if it is not there."""
    machine = hashlib.sha256(repr(sorted(cpu_class().items())).encode()).hexdigest()[:12]
    build = Path(cache_dir).expanduser() / "llama.cpp" / f"server-{VERSION}-{machine}"
    out = build / "bin" / "llama-server"
    if out.is_file():
        return out
    if shutil.which("cmake") is None:
        raise LlamaCppUnavailable("building llama-server needs cmake (apt-get install cmake)")
    try:
        source = llama_cpp_source(cache_dir) / "vendor" / "llama.cpp"
    except SourceUnavailable as exc:
        raise LlamaCppUnavailable(str(exc)) from exc
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF"]
    options += ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log.info("building llama.cpp's llama-server for this CPU into %s (minutes, once)...", build)
    for command in (
        ["cmake", "-S", str(source), "-B", str(build), *generator, *options],
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
    ):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise LlamaCppUnavailable(f"building llama-server failed ({' '.join(command[:2])}):\n{tail}")
    return out


def server_args(gguf: Path, context: int, slots: int, threads: int, served_name: str) -> list[str]:
    """``llama-server``'s arguments: ``slots`` parallel slots of ``context`` tokens each (its context is
    split evenly between them), ``threads`` threads, the model served as ``served_name``."""
    args = ["--host", "127.0.0.1", "-m", str(gguf), "-a", served_name, "--no-webui"]
    args += ["-c", str(context * slots), "-np", str(slots), "-t", str(threads), "-tb", str(threads)]
    return args + (["--no-repack"] if "amx_int8" in cpu_flags() else [])
