#!/usr/bin/env python3
"""Disk read bandwidth at expert block size: the engine's probe (fm_io_probe) vs plain os.pread.

For each block size and io thread count, measures random block-aligned reads (no block twice in
one measurement) of a scratch file:
  engine-cold     fm_io_probe, buffered, page cache dropped first (posix_fadvise DONTNEED)
  engine-direct   fm_io_probe through O_DIRECT (bypasses the page cache)
  engine-warm     fm_io_probe, buffered, whole file in the page cache
  python-cold     os.pread from a ThreadPoolExecutor, page cache dropped first
  python-warm     os.pread, file in the page cache
Modes are interleaved within each of -r repeats; prints median, min and max GB/s (1 GB = 1e9 B) and optional CSV.

  python bench/io_probe.py --dir /work --size-gb 2 -r 5
The scratch file is deleted afterwards (--keep to keep it).
"""
import argparse
import concurrent.futures as cf
import ctypes
import os
import platform
import random
import statistics
import subprocess
import sys
import time


def _load_lib():
    """The built extension (exports fm_io_probe), or FM_IO_LIB=path: a bare build of csrc/fm_io.c
    (gcc -O2 -shared -fPIC -pthread -D_GNU_SOURCE -Icsrc csrc/fm_io.c -o libfmio.so) for machines
    without the extension."""
    if os.environ.get("FM_IO_LIB"):
        return ctypes.CDLL(os.environ["FM_IO_LIB"])
    import pyflashmoe._core as _core
    return ctypes.CDLL(_core.__file__)


LIB = _load_lib()
LIB.fm_io_probe.restype = ctypes.c_int
LIB.fm_io_probe.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                            ctypes.POINTER(ctypes.c_double), ctypes.c_char_p, ctypes.c_size_t]


def engine_probe(path, block, n_reads, threads, direct):
    g = ctypes.c_double()
    err = ctypes.create_string_buffer(512)
    st = LIB.fm_io_probe(path.encode(), block, n_reads, threads, int(direct), ctypes.byref(g), err, 512)
    if st != 0:
        raise OSError(err.value.decode())
    return g.value


def python_probe(path, block, n_reads, threads):
    fd = os.open(path, os.O_RDONLY)
    try:
        n_blocks = os.fstat(fd).st_size // block
        order = random.sample(range(n_blocks), min(n_reads, n_blocks))
        order += [random.randrange(n_blocks) for _ in range(n_reads - len(order))]

        def one(i):
            off, got = i * block, 0
            while got < block:
                b = os.pread(fd, block - got, off + got)
                if not b:
                    raise OSError(f"{path}: short read at {off + got}")
                got += len(b)
            return got

        with cf.ThreadPoolExecutor(threads) as ex:  # pool started outside the timed region (no reads:
            list(ex.map(time.sleep, [0.001] * threads))  # a warm-up read would make a cold run partly warm)
            t0 = time.perf_counter()
            total = sum(ex.map(one, order))
            dt = time.perf_counter() - t0
        return total / dt / 1e9
    finally:
        os.close(fd)


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def make_file(path, size):
    chunk = os.urandom(64 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


def machine_info(path):
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = "?"
    try:
        dev = subprocess.run(["df", "--output=source,fstype", path], capture_output=True, text=True).stdout.split("\n")[1]
    except Exception:
        pass
    return f"{platform.node()} | {cpu} | {os.cpu_count()} CPUs | {dev.strip()}"


def commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except Exception:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/work", help="where the scratch file goes (a real disk, not tmpfs)")
    ap.add_argument("--file", default=None, help="probe this existing file instead (never deleted)")
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--blocks", default="1769472,7077888", help="block sizes in bytes (multiples of 4096)")
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--reads", type=int, default=0, help="reads per measurement (default: ~512 MB worth)")
    ap.add_argument("-r", "--repeats", type=int, default=5)
    ap.add_argument("--modes", default="engine-cold,engine-direct,engine-warm,python-cold,python-warm")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)

    blocks = [int(x) for x in a.blocks.split(",")]
    threads = [int(x) for x in a.threads.split(",")]
    modes = a.modes.split(",")
    own = a.file is None
    path = a.file or os.path.join(a.dir, f"pyflashmoe-io-probe-{os.getpid()}.bin")
    if own:
        size = int(a.size_gb * 1e9) // (1 << 20) * (1 << 20)
        t0 = time.perf_counter()
        make_file(path, size)
        print(f"# wrote {size / 1e9:.2f} GB scratch file {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    size = os.path.getsize(path)
    print(f"# machine: {machine_info(path)}")
    print(f"# commit: {commit()}  python {platform.python_version()}  file {size / 1e9:.2f} GB")
    print(f"# command: {' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}")
    rows = []
    vals = {}
    try:
        # modes interleaved inside each repeat, so load from other processes hits them all alike
        for rep in range(a.repeats):
            for block in blocks:
                n_reads = a.reads or max(8, min(size // block, (512 << 20) // block))
                order = [m for m in modes if m.endswith("cold") or m.endswith("direct")]
                order += [m for m in modes if m.endswith("warm")]
                warmed = False
                for mode in order:
                    if mode.endswith("warm") and not warmed:
                        warm_cache(path)
                        warmed = True
                    for t in threads:
                        if mode.endswith("cold"):
                            drop_cache(path)
                        try:
                            if mode in ("engine-cold", "engine-warm"):
                                g = engine_probe(path, block, n_reads, t, False)
                            elif mode == "engine-direct":
                                g = engine_probe(path, block, n_reads, t, True)
                            else:
                                g = python_probe(path, block, n_reads, t)
                        except OSError as e:
                            print(f"# {mode} t={t}: {e}")
                            continue
                        vals.setdefault((block, mode, t), []).append(g)
            print(f"# repeat {rep + 1}/{a.repeats} done", flush=True)
        print(f"{'block_bytes':>11} {'mode':>13} {'threads':>7} {'median GB/s':>11} {'min':>7} {'max':>7}  reads")
        for block in blocks:
            n_reads = a.reads or max(8, min(size // block, (512 << 20) // block))
            for mode in modes:
                for t in threads:
                    v = vals.get((block, mode, t))
                    if not v:
                        continue
                    med = statistics.median(v)
                    rows.append((block, mode, t, med, min(v), max(v), n_reads, len(v)))
                    print(f"{block:>11} {mode:>13} {t:>7} {med:>11.3f} {min(v):>7.3f} {max(v):>7.3f}  "
                          f"{n_reads} x{len(v)}", flush=True)
    finally:
        if own and not a.keep:
            os.unlink(path)
            print(f"# deleted {path}")
    if a.csv:
        with open(a.csv, "w") as f:
            f.write("block_bytes,mode,threads,median_gbps,min_gbps,max_gbps,reads,repeats\n")
            for r in rows:
                f.write(",".join(str(round(x, 4)) if isinstance(x, float) else str(x) for x in r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
