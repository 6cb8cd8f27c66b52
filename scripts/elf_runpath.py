#!/usr/bin/env python3
"""Replaces an ELF file's RUNPATH (or RPATH) in place with a shorter one, for the copies that
scripts/pack-device.sh carries to the GPU machine: the build's RUNPATH names this machine's
build/lib and .venv, and the carried binaries must find libkiln beside them ($ORIGIN/../lib) and
torch only through LD_LIBRARY_PATH, there and in the dry run here alike.

The new string is written over the old one in .dynstr and padded with NULs, so nothing moves.
Refuses (exit 3, file untouched) when the new string is longer, or when another name in .dynstr
(a symbol, a needed library, a version) is a tail of the old one that the linker shares with it.
Usage: elf_runpath.py FILE NEW_RUNPATH
"""
import struct
import sys

DT_NULL, DT_NEEDED, DT_RPATH, DT_SONAME, DT_RUNPATH = 0, 1, 15, 14, 29
DT_AUXILIARY, DT_FILTER = 0x7FFFFFFD, 0x7FFFFFFF
SHT_DYNSYM, SHT_DYNAMIC, SHT_GNU_VERDEF, SHT_GNU_VERNEED = 11, 6, 0x6FFFFFFD, 0x6FFFFFFE


def sections(data):
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit("elf_runpath: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, ...
        _, kind, _, _, offset, size, link, info = struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize)
        yield i, kind, offset, size, link, info


def string_references(data, table):
    """Every .dynstr offset that something in the file refers to, with the dynamic entries apart."""
    dynamic, others = [], []
    for _, kind, offset, size, link, info in sections(data):
        if link != table:
            continue
        if kind == SHT_DYNAMIC:
            for at in range(offset, offset + size, 16):
                tag, value = struct.unpack_from("<qQ", data, at)
                if tag == DT_NULL:
                    break
                if tag in (DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH, DT_AUXILIARY, DT_FILTER):
                    dynamic.append((tag, value, at))
        elif kind == SHT_DYNSYM:
            others += [struct.unpack_from("<I", data, at)[0] for at in range(offset, offset + size, 24)]
        elif kind == SHT_GNU_VERNEED:
            at = offset
            for _ in range(info):
                _, count, file_name, aux, following = struct.unpack_from("<HHIII", data, at)
                others.append(file_name)
                entry = at + aux
                for _ in range(count):
                    _, _, _, name, next_aux = struct.unpack_from("<IHHII", data, entry)
                    others.append(name)
                    entry += next_aux
                at += following
        elif kind == SHT_GNU_VERDEF:
            at = offset
            for _ in range(info):
                _, _, _, count, _, aux, following = struct.unpack_from("<HHHHIII", data, at)
                entry = at + aux
                for _ in range(count):
                    name, next_aux = struct.unpack_from("<II", data, entry)
                    others.append(name)
                    entry += next_aux
                at += following
    return dynamic, others


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    path, new = sys.argv[1], sys.argv[2].encode()
    with open(path, "rb") as f:
        data = bytearray(f.read())
    table = next((link for _, kind, _, _, link, _ in sections(data) if kind == SHT_DYNAMIC), None)
    if table is None:
        raise SystemExit(f"elf_runpath: {path} has no .dynamic section")
    table_offset = next(offset for i, _, offset, _, _, _ in sections(data) if i == table)
    dynamic, others = string_references(data, table)
    paths = [(tag, value) for tag, value, _ in dynamic if tag in (DT_RPATH, DT_RUNPATH)]
    if not paths:
        print(f"elf_runpath: {path} has no RUNPATH; left as it is")
        return 0
    references = others + [value for tag, value, _ in dynamic if tag not in (DT_RPATH, DT_RUNPATH)]
    for _, start in paths:
        end = data.index(b"\0", table_offset + start) - table_offset
        if len(new) > end - start:
            print(f"elf_runpath: {path}: {new.decode()!r} is longer than the RUNPATH it replaces", file=sys.stderr)
            return 3
        if any(start <= r < end for r in references):
            print(f"elf_runpath: {path}: the RUNPATH shares its bytes with another name", file=sys.stderr)
            return 3
    for _, start in paths:
        end = data.index(b"\0", table_offset + start) - table_offset
        data[table_offset + start:table_offset + end] = new.ljust(end - start, b"\0")
    with open(path, "r+b") as f:
        f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
