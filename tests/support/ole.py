"""A minimal OLE compound file (CFB v3) writer, for test fixtures that no library writes:
an old-style Word document holding a VBA project (MS-OVBA 2.2.1 layout: Macros/PROJECT,
Macros/VBA/_VBA_PROJECT, Macros/VBA/dir and a module stream).

Every stream is kept in regular 512-byte sectors (mini-stream cutoff 0), which readers accept;
module source and the dir stream use MS-OVBA compression with literal tokens only.
"""

from __future__ import annotations

import struct

SECTOR = 512
FREE, END, FATSECT, NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def ovba_compress(data: bytes, pad: bytes = b" ") -> bytes:
    """MS-OVBA 2.4.1 compressed container made of uncompressed chunks (flag 0, 4096 raw bytes
    each): valid, just not smaller. The data is padded to whole chunks with `pad`."""
    if len(data) % 4096:
        data += pad * (4096 - len(data) % 4096)
    out = bytearray(b"\x01")
    for start in range(0, len(data), 4096):
        out += struct.pack("<H", 0x0FFF | (0b011 << 12)) + data[start:start + 4096]
    return bytes(out)


def _record(rid: int, data: bytes) -> bytes:
    return struct.pack("<HI", rid, len(data)) + data


def vba_dir(module: str) -> bytes:
    """The dir stream of a one-module project (MS-OVBA 2.3.4.2), uncompressed."""
    name = module.encode()
    uname = module.encode("utf-16-le")
    d = bytearray()
    d += _record(0x0001, struct.pack("<I", 1))  # PROJECTSYSKIND: win32
    d += _record(0x0002, struct.pack("<I", 0x409))  # PROJECTLCID
    d += _record(0x0014, struct.pack("<I", 0x409))  # PROJECTLCIDINVOKE
    d += _record(0x0003, struct.pack("<H", 1252))  # PROJECTCODEPAGE
    d += _record(0x0004, b"Project")  # PROJECTNAME
    d += _record(0x0005, b"") + _record(0x0040, b"")  # PROJECTDOCSTRING (+ unicode)
    d += _record(0x0006, b"") + _record(0x003D, b"")  # PROJECTHELPFILEPATH (+ 2)
    d += _record(0x0007, struct.pack("<I", 0))  # PROJECTHELPCONTEXT
    d += _record(0x0008, struct.pack("<I", 0))  # PROJECTLIBFLAGS
    d += struct.pack("<HIIH", 0x0009, 4, 1, 0)  # PROJECTVERSION (size field is reserved 4)
    d += _record(0x000C, b"") + _record(0x003C, b"")  # PROJECTCONSTANTS (+ unicode)
    d += _record(0x000F, struct.pack("<H", 1))  # PROJECTMODULES: count
    d += _record(0x0013, struct.pack("<H", 0xFFFF))  # PROJECTCOOKIE
    d += _record(0x0019, name)  # MODULENAME
    d += _record(0x0047, uname)  # MODULENAMEUNICODE
    d += _record(0x001A, name) + _record(0x0032, uname)  # MODULESTREAMNAME (+ unicode)
    d += _record(0x001C, b"") + _record(0x0048, b"")  # MODULEDOCSTRING (+ unicode)
    d += _record(0x0031, struct.pack("<I", 0))  # MODULEOFFSET: source at offset 0
    d += _record(0x001E, struct.pack("<I", 0))  # MODULEHELPCONTEXT
    d += _record(0x002C, struct.pack("<H", 0xFFFF))  # MODULECOOKIE
    d += _record(0x0021, b"")  # MODULETYPE: procedural
    d += _record(0x002B, b"")  # module terminator
    d += _record(0x0010, b"")  # dir terminator
    return bytes(d)


def _entry(name: str, kind: int, child: int = NOSTREAM, right: int = NOSTREAM,
           start: int = END, size: int = 0, left: int = NOSTREAM) -> bytes:
    """A 128-byte directory entry (siblings form the tree; all black)."""
    encoded = (name.encode("utf-16-le") + b"\x00\x00") if name else b""
    return (encoded.ljust(64, b"\x00") + struct.pack("<HBB", len(encoded), kind, 1)
            + struct.pack("<III", left, right, child) + b"\x00" * 16 + b"\x00" * 4
            + b"\x00" * 16 + struct.pack("<II", start, size) + b"\x00" * 4)


def word_document_with_macro(source: str, module: str = "ThisDocument") -> bytes:
    # Streams under 4,096 bytes would belong in the mini stream (readers insist on that
    # cutoff): each is made at least that long, with padding its format ignores.
    project = (f'ID="{{00000000-0000-0000-0000-000000000000}}"\r\nDocument={module}/&H00000000'
               '\r\nName="Project"\r\n')
    streams = {
        "PROJECT": (project + "\r\n" * 2100).encode(),
        "_VBA_PROJECT": b"\xcc\x61\xff\xff\x00\x00\x00".ljust(4096, b"\x00"),
        "dir": ovba_compress(vba_dir(module), pad=b"\x00"),
        module: ovba_compress(source.encode("cp1252")),
        "WordDocument": b"\xec\xa5\xc1\x00".ljust(4096, b"\x00"),
    }
    # Sectors: 0 = FAT, 1.. = directory, then the streams one after the other.
    order = ["PROJECT", "_VBA_PROJECT", "dir", module, "WordDocument"]
    dir_sectors = 2  # 8 entries
    layout: dict[str, tuple[int, int]] = {}
    next_sector = 1 + dir_sectors
    body = bytearray()
    for name in order:
        data = streams[name]
        count = max(1, -(-len(data) // SECTOR))
        layout[name] = (next_sector, count)
        body += data.ljust(count * SECTOR, b"\x00")
        next_sector += count
    fat = [FATSECT] + [1 + i + 1 for i in range(dir_sectors - 1)] + [END]
    for name in order:
        start, count = layout[name]
        fat += [start + i + 1 for i in range(count - 1)] + [END]
    fat += [FREE] * (SECTOR // 4 - len(fat))
    if len(fat) > SECTOR // 4:
        raise ValueError("fixture too large for one FAT sector")
    # Directory: 0 Root -> 1 WordDocument, 2 Macros; Macros -> 3 VBA, 4 PROJECT;
    # VBA -> 5 dir, 6 _VBA_PROJECT, 7 module.
    def ent(name: str, **kw: int) -> bytes:
        return _entry(name, 2, start=layout[name][0], size=len(streams[name]), **kw)
    entries = [
        _entry("Root Entry", 5, child=2),
        ent("WordDocument"),
        _entry("Macros", 1, child=3, right=1),
        _entry("VBA", 1, child=6, right=4),
        ent("PROJECT"),
        ent("dir"),
        ent("_VBA_PROJECT", left=5, right=7),
        ent(module),
    ]
    directory = b"".join(entries).ljust(dir_sectors * SECTOR, b"\x00")
    header = bytearray(SECTOR)
    header[0:8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    struct.pack_into("<HHHHH", header, 24, 0x3E, 3, 0xFFFE, 9, 6)
    struct.pack_into("<IIIIIIIII", header, 40, 0, 1, 1, 0, 0, END, 0, END, 0)
    struct.pack_into("<I", header, 76, 0)
    for i in range(1, 109):
        struct.pack_into("<I", header, 76 + 4 * i, FREE)
    fat_bytes = b"".join(struct.pack("<I", x) for x in fat)
    return bytes(header) + fat_bytes + directory + bytes(body)
