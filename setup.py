"""Builds kvtier's three C++ extensions, and a CUDA one on CUDA machines; everything else is in
pyproject.toml.

- `kvtier.codecs._cachegen_native` (csrc/module.cpp, rans.cpp, quant.cpp: the cachegen codec's rANS
  coder and quantiser), with torch's C++ extension tooling;
- `kvtier.platforms._paged_copy` (csrc/paged_copy.cpp: the CPU platform's multi-threaded paged block
  copies), plain CPython API like the next one;
- `kvtier._native_keys` (csrc/native_keys.cpp: the lookup's chunk keys; csrc/key_table.cpp: the CPU
  tier's key set; csrc/checksum_copy.cpp: a record's checksum fused with its copy out;
  csrc/record_read.cpp: a record file's read), plain CPython API with no
  torch (kvtier_server imports the keys and never torch), hashing with the xxhash package's XXH3;
- `kvtier.platforms._paged_copy_cuda` (csrc/paged_copy_cuda.cu: the CUDA platform's paged block copies
  in one kernel launch), only where torch is a CUDA build and a CUDA toolkit (nvcc) is found: a CPU
  machine never compiles it, and never needs a CUDA package for it.

Each extension is optional: without a C++ compiler, or when its compile fails, this prints one
warning for it and installs kvtier without it (the others still build); `kvtier.codecs.native`
then falls back to the numpy reference, `kvtier.native_keys` to Python and
`kvtier.platforms.cpu_ops` to torch (same bytes, slower). Without torch in the build environment only
the cachegen coder is left out. Both are CPU code only
(never CUDA) with portable flags (no -march=native: the wheel or editable build must run on any CPU
of the architecture). `pip install --no-build-isolation -e .` builds them in place.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXTENSION = "kvtier.codecs._cachegen_native"
SOURCES = ["csrc/module.cpp", "csrc/rans.cpp", "csrc/quant.cpp"]
# -ffp-contract=off: no fused multiply-add, so float results match numpy's bit for bit on any CPU.
FLAGS = ["-O3", "-g0", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden"]

# The CPU platform's paged block copies: all layers of a request's blocks in one multi-threaded call.
PAGED_EXTENSION = "kvtier.platforms._paged_copy"
PAGED_SOURCES = ["csrc/paged_copy.cpp"]
CUDA_EXTENSION = "kvtier.platforms._paged_copy_cuda"
CUDA_SOURCES = ["csrc/paged_copy_cuda.cu"]

KEYS_EXTENSION = "kvtier._native_keys"
KEYS_SOURCES = ["csrc/native_keys.cpp", "csrc/key_table.cpp", "csrc/checksum_copy.cpp", "csrc/record_read.cpp"]
KEYS_FLAGS = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden"]

WITHOUT = {  # what kvtier does without each extension
    EXTENSION: ("the C++ cachegen coder", "codes cachegen records with the numpy reference (same bytes, "
                "several times slower)"),
    PAGED_EXTENSION: ("the C++ paged block copies", "copies KV between chunks and an engine's blocks "
                      "with torch on one thread"),
    CUDA_EXTENSION: ("the CUDA paged copy kernel", "moves KV between chunks and the GPU's blocks with torch "
                     "index copies"),
    KEYS_EXTENSION: ("the C++ chunk key builder", "computes chunk keys in Python (same keys, slower "
                     "lookups) and checksums disk reads and copies them out in two passes"),
}


def warn_without_extension(reason: str, names: Sequence[str] = (EXTENSION,)) -> None:
    it = "it" if len(names) == 1 else "them"
    what = " and ".join(f"{WITHOUT[name][0]} ({name})" for name in names)
    reason = reason.rstrip(".")
    toolkit = " and the CUDA toolkit" if CUDA_EXTENSION in names else ""
    print(
        f"WARNING: kvtier: {what} {'was' if len(names) == 1 else 'were'} not built: {reason}. kvtier is "
        f"installed without {it} and {' and '.join(WITHOUT[name][1] for name in names)}. Install a C++ "
        f"compiler (g++ or clang++){toolkit} and reinstall to build {it}.",
        file=sys.stderr,
        flush=True,
    )


def optional_build(base: type) -> type:
    """`base` (torch's BuildExtension, or setuptools' build_ext without torch) made lenient: an
    extension whose build fails warns and is not shipped; the others are."""

    class OptionalBuildExtension(base):
        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # a missing compiler is an OSError, a failed one CompileError
                names = [n for n in (getattr(ext, "name", None) for ext in self.extensions) if n in WITHOUT]
                warn_without_extension(f"{type(exc).__name__}: {exc}", names or [EXTENSION])
                self.extensions = []  # so the install does not look for the missing files

        def build_extensions(self) -> None:
            built = []
            for ext in list(self.extensions):  # one at a time: a failed one leaves the others
                self.extensions = [ext]
                try:
                    super().build_extensions()
                    built.append(ext)
                except Exception as exc:
                    warn_without_extension(f"{type(exc).__name__}: {exc}", [ext.name])
            self.extensions = built  # what is copied in place and installed

        def get_outputs(self) -> list[str]:
            return super().get_outputs() if self.extensions else []

    return OptionalBuildExtension


def extension_args() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch absent from the build environment (an isolated build)
        warn_without_extension(f"torch is not importable at build time ({exc})")
        return {}
    ext = CppExtension(EXTENSION, SOURCES, extra_compile_args=FLAGS)
    cmdclass = {"build_ext": optional_build(BuildExtension)}
    return {"ext_modules": [ext, *cuda_extension()], "cmdclass": cmdclass}


def cuda_extension() -> list:
    """The CUDA paged copies, where torch is a CUDA build and nvcc is found; nothing on a CPU torch."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None:
        return []
    if CUDA_HOME is None:
        warn_without_extension("torch is a CUDA build but no CUDA toolkit (nvcc, CUDA_HOME) was found",
                               [CUDA_EXTENSION])
        return []
    return [CUDAExtension(CUDA_EXTENSION, CUDA_SOURCES,
                          extra_compile_args={"cxx": KEYS_FLAGS, "nvcc": ["-O3", "-std=c++17"]})]


def keys_extension() -> Extension:
    # dlopen() is in libdl before glibc 2.34 (a stub after).
    libraries = ["dl"] if sys.platform.startswith("linux") else []
    return Extension(KEYS_EXTENSION, KEYS_SOURCES, extra_compile_args=KEYS_FLAGS, libraries=libraries,
                     language="c++")


def build_args() -> dict:
    """extension_args() (the cachegen coder, with torch) plus the chunk keys and the paged copies,
    which build without torch (setuptools' own build_ext, made lenient the same way)."""
    args = extension_args()
    cmdclass = args.get("cmdclass") or {"build_ext": optional_build(build_ext)}
    paged = Extension(PAGED_EXTENSION, PAGED_SOURCES, extra_compile_args=KEYS_FLAGS, language="c++")
    return {"ext_modules": [*args.get("ext_modules", []), keys_extension(), paged], "cmdclass": cmdclass}


if __name__ == "__main__":
    setup(**build_args())
