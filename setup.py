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

sources = ["pyflashmoe/_core.pyx"] + sorted(glob.glob("csrc/*.c")) + ["csrc/cuda/fm_ref.c"]


# ---- CUDA (csrc/cuda): nvcc compiles the .cu files to objects cached under build/cuda; the
# extension links the CUDA runtime statically so it imports on machines without a GPU or driver.
def _nvcc_setup():
    mode = os.environ.get("FLASHMOE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FLASHMOE_CUDA must be auto, 0 or 1 (got {mode!r})")
    if mode == "0":
        return None
    import shutil
    import subprocess
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    if not nvcc:
        if mode == "1":
            raise SystemExit("FLASHMOE_CUDA=1 but nvcc was not found on PATH (set NVCC=/path/to/nvcc)")
        print("pyflashmoe: nvcc not found, building without the CUDA backend")
        return None
    top = None
    try:  # nvcc may be a wrapper script: ask it where its toolkit lives
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if line.startswith("#$ TOP="):
                top = os.path.normpath(line.split("=", 1)[1].strip())
    except Exception:
        pass
    cands = [top, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    libdir = None
    for c in cands:
        if not c:
            continue
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if os.path.isfile(os.path.join(c, sub, "libcudart_static.a")):
                libdir = os.path.join(c, sub)
                break
        if libdir:
            break
    if not libdir:
        if mode == "1":
            raise SystemExit(f"FLASHMOE_CUDA=1 but libcudart_static.a was not found near {nvcc}")
        print("pyflashmoe: libcudart_static.a not found, building without the CUDA backend")
        return None
    archs = os.environ.get("FLASHMOE_CUDA_ARCHS", "80,90").split(",")
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Icsrc", "-D_GNU_SOURCE", "--threads", "2"]
    for a in archs:
        a = a.strip()
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1].strip()},code=compute_{archs[-1].strip()}"]
    if debug:
        flags += ["-g", "-lineinfo"]
    import hashlib
    # objects are named by a hash of the flags and every source they may include, so a cached
    # object is reused exactly when nothing changed (mtimes do not survive copies)
    h = hashlib.sha1(" ".join(flags).encode())
    for d in sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cuh") + glob.glob("csrc/*.h")):
        with open(d, "rb") as f:
            h.update(d.encode() + b"\0" + f.read())
    tag = h.hexdigest()[:12]
    objs = []
    os.makedirs("build/cuda", exist_ok=True)
    for cu in sorted(glob.glob("csrc/cuda/*.cu")):
        obj = os.path.join("build/cuda", os.path.basename(cu)[:-3] + f"-{tag}.o")
        if not os.path.isfile(obj):
            tmp = obj + ".tmp"
            cmd = [nvcc] + flags + ["-c", cu, "-o", tmp]
            print("pyflashmoe: " + " ".join(cmd))
            subprocess.run(cmd, check=True)
            os.replace(tmp, obj)
        objs.append(obj)
    return objs, [f"-L{libdir}", "-lcudart_static", "-ldl", "-lrt", "-lstdc++"]


_cuda = _nvcc_setup()
extra_objects = []
if _cuda:
    extra_objects, _cuda_ld = _cuda
    ldflags += _cuda_ld
else:
    sources.append("csrc/cuda/fm_cuda_stub.c")

ext = Extension(
    "pyflashmoe._core",
    sources=sources,
    include_dirs=["csrc"],
    extra_objects=extra_objects,
    define_macros=[("_GNU_SOURCE", "1")],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("pyflashmoe/*.pxi")) + ["pyflashmoe/_fm.pxd"]
    + extra_objects,
)

setup(
    ext_modules=cythonize(
        [ext],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "embedsignature": True},
    )
)
