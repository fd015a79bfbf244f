#!/usr/bin/env python3
"""cuda_archs.py BINARY [--expect ARCHS] — which GPU code a binary carries.

Reads the CUDA fat binaries of BINARY's `.nv_fatbin` section (extracted with binutils'
objcopy: the CUDA toolkit's cuobjdump is not needed) and prints one line per kind of code:
native code (SASS) as sm_NN and PTX as compute_NN.

--expect takes a CMake CUDA_ARCHITECTURES list ("75-real;80-real;90": N-real is native
code only, N-virtual PTX only, plain N both) and exits 1 unless every translation unit's
fat binary carries exactly that code. PTX for sm_80 or newer must also hold the tensor-core
instructions (mma.sync) and, from sm_90 on, programmatic dependent launch
(griddepcontrol.wait): a build whose `__CUDA_ARCH__ >= 800` paths were compiled out fails.

Fat binary layout (as nvcc 12-13 writes it; little-endian): a header {u32 magic 0xBA55ED50,
u16 version, u16 header size, u64 size of the entries}, then entries {u16 kind (1 PTX,
2 ELF), u16 version, u32 header size, u32 payload size, ..., u32 architecture at byte 28,
...}, each followed by its payload.
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile

MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def fatbin_section(path):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "fatbin")
        r = subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", path, out],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"cuda_archs: objcopy could not read {path}: {r.stderr.strip()}")
        with open(out, "rb") as f:
            return f.read()


def fat_binaries(blob):
    """yields, for each translation unit, a list of (kind, arch, payload)"""
    off = 0
    while off + 16 <= len(blob):
        magic, _ver, hsize, size = struct.unpack_from("<IHHQ", blob, off)
        if magic != MAGIC:
            # the section pads fat binaries to an alignment with zeros
            off += 8
            continue
        p, end = off + hsize, off + hsize + size
        if end > len(blob):
            sys.exit(f"cuda_archs: a fat binary at {off} runs past the section ({end} > {len(blob)})")
        entries = []
        while p + 32 <= end:
            kind, _v, ehsize, psize = struct.unpack_from("<HHII", blob, p)
            arch = struct.unpack_from("<I", blob, p + 28)[0]
            if ehsize < 32 or p + ehsize + psize > end:
                sys.exit(f"cuda_archs: a malformed entry at {p}")
            entries.append((kind, arch, blob[p + ehsize:p + ehsize + psize]))
            p += ehsize + psize
        yield entries
        off = end


def expected(spec):
    want = set()
    for item in filter(None, spec.replace(" ", ";").split(";")):
        n, _, suffix = item.partition("-")
        if not n.isdigit() or suffix not in ("", "real", "virtual"):
            sys.exit(f"cuda_archs: cannot read architecture '{item}'")
        if suffix in ("", "real"):
            want.add(f"sm_{n}")
        if suffix in ("", "virtual"):
            want.add(f"compute_{n}")
    return want


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--expect", help="CMake CUDA_ARCHITECTURES list the binary must carry exactly")
    a = ap.parse_args()
    units = list(fat_binaries(fatbin_section(a.binary)))
    if not units:
        print(f"{a.binary}: no CUDA code")
        return 1 if a.expect else 0
    want = expected(a.expect) if a.expect else None
    bad = 0
    seen = set()
    for i, entries in enumerate(units):
        have = set()
        for kind, arch, payload in entries:
            name = ("compute_" if kind == KIND_PTX else "sm_") + str(arch)
            have.add(name)
            if kind == KIND_PTX and arch >= 80 and want is not None:
                text = payload.decode("latin-1")
                # a translation unit with no kernel of that kind has nothing to find: only
                # the units that hold any tensor-core or launch code are held to it
                if ".entry" in text and "mma_kernel" in text and "mma.sync" not in text:
                    print(f"unit {i}: compute_{arch} PTX has tensor-core kernels without mma.sync")
                    bad = 1
                if arch >= 90 and ".entry" in text and "griddepcontrol.wait" not in text:
                    print(f"unit {i}: compute_{arch} PTX lacks griddepcontrol.wait")
                    bad = 1
        seen |= have
        if want is not None and have != want:
            print(f"unit {i}: carries {' '.join(sorted(have))}, expected {' '.join(sorted(want))}")
            bad = 1
    print(" ".join(sorted(seen, key=lambda s: (s.startswith("compute"), int(s.split("_")[1])))))
    if want is not None and not bad:
        print(f"ok: {len(units)} fat binaries carry exactly {' '.join(sorted(want))}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
