"""Build pyflashmoe._core: the Cython boundary plus the C11 core in csrc/.

SIMD is chosen at run time (function-level target attributes in csrc), so one build runs on any
x86-64 or arm64 CPU. Switches (environment):
  FLASHMOE_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer, -O1 -g
  FLASHMOE_DEBUG=1      -O0 -g
  FLASHMOE_CUDA=auto|0|1  CUDA sources in csrc/cuda (auto: when nvcc is found)
"""
import glob
import os
import platform

from Cython.Build import cythonize
from setuptools import Extension, setup

sanitize = os.environ.get("FLASHMOE_SANITIZE", "0") == "1"
debug = os.environ.get("FLASHMOE_DEBUG", "0") == "1"

cflags = ["-std=gnu11", "-fPIC", "-pthread", "-Wall", "-Wno-unused-function", "-fno-strict-aliasing"]
ldflags = ["-pthread", "-lm"]
if sanitize:
    cflags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
    ldflags += ["-fsanitize=address,undefined"]
elif debug:
    cflags += ["-O0", "-g"]
else:
    cflags += ["-O3"]
if platform.machine() in ("x86_64", "AMD64"):
    # baseline stays x86-64: AVX2/AVX-512 paths use target attributes and run-time dispatch
    cflags += ["-mtune=generic"]

sources = ["pyflashmoe/_core.pyx"] + sorted(glob.glob("csrc/*.c"))

ext = Extension(
    "pyflashmoe._core",
    sources=sources,
    include_dirs=["csrc"],
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("pyflashmoe/*.pxi")) + ["pyflashmoe/_fm.pxd"],
)

setup(
    ext_modules=cythonize(
        [ext],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "embedsignature": True},
    )
)
