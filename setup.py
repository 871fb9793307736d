"""Builds kvtier's one C++ extension, `kvtier.codecs._cachegen_native` (csrc/: the cachegen codec's
rANS coder and quantiser), with torch's C++ extension tooling; everything else is in pyproject.toml.

The extension is optional: without a C++ compiler, without torch in the build environment, or when
the compile fails, this prints one warning and installs kvtier without it, and
`kvtier.codecs.native` falls back to the numpy reference (same bytes, slower). It is CPU code only
(CppExtension, never CUDA) with portable flags (no -march=native: the wheel or editable build must
run on any CPU of the architecture). `pip install --no-build-isolation -e .` builds it in place.
"""

from __future__ import annotations

import sys

from setuptools import setup

EXTENSION = "kvtier.codecs._cachegen_native"
SOURCES = ["csrc/module.cpp", "csrc/rans.cpp", "csrc/quant.cpp"]
# -ffp-contract=off: no fused multiply-add, so float results match numpy's bit for bit on any CPU.
FLAGS = ["-O3", "-g0", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden"]


def warn_without_extension(reason: str) -> None:
    reason = reason.rstrip(".")
    print(
        f"WARNING: kvtier: the C++ cachegen coder ({EXTENSION}) was not built: {reason}. kvtier is "
        "installed without it and codes cachegen records with the numpy reference (same bytes, "
        "several times slower). Install a C++ compiler (g++ or clang++) and reinstall to build it.",
        file=sys.stderr,
        flush=True,
    )


def optional_build(base: type) -> type:
    """`base` (torch's BuildExtension) made lenient: a failed build warns and ships no extension."""

    class OptionalBuildExtension(base):
        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # a missing compiler is an OSError, a failed one CompileError
                warn_without_extension(f"{type(exc).__name__}: {exc}")
                self.extensions = []  # so the install does not look for the missing file

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
    return {"ext_modules": [ext], "cmdclass": {"build_ext": optional_build(BuildExtension)}}


if __name__ == "__main__":
    setup(**extension_args())
