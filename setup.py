"""The Cython extension table and build_ext; everything else lives in pyproject.toml.

Each ``ext/<name>.pyx`` builds to ``engine._ext.<name>``.  Switches (environment):

- ``FERRY_BUILD_ONLY=wire,command``: build only these modules (work on one module while
  another is broken);
- ``FERRY_DEBUG_BUILD=1``: keep bounds and wraparound checks, emit annotated HTML, build
  with ``-O0 -g`` (generated C goes to build/cython-debug/, release C to build/cython/);
- ``FERRY_CYTHON_ALWAYS=1``: re-cythonize even when the .c file looks fresh.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
DEBUG = os.environ.get("FERRY_DEBUG_BUILD", "") not in ("", "0")
ONLY = {n for n in os.environ.get("FERRY_BUILD_ONLY", "").split(",") if n}

names = sorted(p.stem for p in (HERE / "ext").glob("*.pyx"))
if ONLY:
    names = [n for n in names if n in ONLY]

extensions = [
    Extension(
        f"engine._ext.{name}",
        [f"ext/{name}.pyx"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    )
    for name in names
]

setup(
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
