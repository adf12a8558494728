"""The Cython extension table and build_ext; everything else lives in pyproject.toml.

Each ``ext/<name>.pyx`` builds to ``engine._ext.<name>``.  Switches (environment):

- ``FERRY_BUILD_ONLY=wire,command``: build only these modules (work on one module while
  another is broken);
- ``FERRY_DEBUG_BUILD=1``: keep bounds and wraparound checks, emit annotated HTML, build
  with ``-O0 -g`` (generated C goes to build/cython-debug/, release C to build/cython/);
- ``FERRY_CYTHON_ALWAYS=1``: re-cythonize even when the .c file looks fresh;
- ``FERRY_REQUIRE_EXTENSIONS=1``: a module that fails to compile fails the install.
  Otherwise (no C compiler or Python headers) the install warns and goes on, and Ferry
  runs on the pure-Python twins (``ferry --version`` says so).
"""

import os
from pathlib import Path
from typing import ClassVar

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

HERE = Path(__file__).parent
DEBUG = os.environ.get("FERRY_DEBUG_BUILD", "") not in ("", "0")
ONLY = {n for n in os.environ.get("FERRY_BUILD_ONLY", "").split(",") if n}
REQUIRE = os.environ.get("FERRY_REQUIRE_EXTENSIONS", "") not in ("", "0")
BUILD_ERRORS = (CCompilerError, CompileError, ExecError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """Compile what can be compiled; the pure-Python twins cover the rest."""

    #: names of the modules that did not compile in this build
    failed: ClassVar[set[str]] = set()

    def run(self) -> None:
        try:
            super().run()
        except BUILD_ERRORS as exc:
            self._give_up("the compiled extensions", exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as exc:
            self.failed.add(ext.name)
            self._give_up(ext.name, exc)

    def get_outputs(self) -> list[str]:
        # what failed to build is not installed (an editable install copies these)
        failed = {self.get_ext_fullpath(name) for name in self.failed}
        return [path for path in super().get_outputs() if path not in failed]

    def copy_extensions_to_source(self) -> None:
        built = self.extensions
        self.extensions = [e for e in built if e.name not in self.failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = built

    @staticmethod
    def _give_up(what: str, exc: Exception) -> None:
        if REQUIRE:
            raise exc
        print(f"WARNING: could not build {what} ({exc}); Ferry will run on its pure-Python "
              "twins. Install a C compiler and the Python headers for the compiled hot path.")


# The .pxi files in ext/ are helpers that several modules ``include``; cythonize follows
# include statements, so changing a .pxi regenerates and recompiles every module using it.
names = sorted(p.stem for p in (HERE / "ext").glob("*.pyx"))
if ONLY:
    names = [n for n in names if n in ONLY]

#: Libraries a module links beyond Python's (pkey: OpenSSL's libcrypto, from libssl-dev;
#: without it that module alone fails to build and its twin runs).
LIBRARIES = {"pkey": ["crypto"]}

extensions = [
    Extension(
        f"engine._ext.{name}",
        [f"ext/{name}.pyx"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
        libraries=LIBRARIES.get(name, []),
    )
    for name in names
]

setup(
    cmdclass={"build_ext": OptionalBuildExt},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        # Separate generated C per mode: a release build must never reuse debug C (with its
        # bounds checks) just because the .c file is newer than the .pyx.
        build_dir="build/cython-debug" if DEBUG else "build/cython",
        force=os.environ.get("FERRY_CYTHON_ALWAYS", "") not in ("", "0"),
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "cdivision": True,
            "initializedcheck": DEBUG,
            "embedsignature": True,
        },
    ),
)
