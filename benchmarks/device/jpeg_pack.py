"""Carry a zip of small JPEGs to the device in a third of its size, byte for byte.

A device call carries 64 MiB with the working tree (24 MB); `cifar10-jpg.zip` is 62 MB. Its 60,000 JPEGs share one
609-byte header (quantisation and Huffman tables) and differ only in their ~275-byte scans, so the pack stores each
distinct header once and every entry as (header id, scan): 19.6 MB with its index. `unpack` rebuilds a zip with the same names and
bytes (each entry's CRC-32 checked against the original's), so the data loader reads it unchanged:

    python benchmarks/device/jpeg_pack.py pack ../shared/data/cifar10-jpg.zip .devdata/cifar10-jpg.pack
    python benchmarks/device/jpeg_pack.py unpack .devdata/cifar10-jpg.pack .devdata/cifar10-jpg.zip   # on the device

Format (no pickle): 8-byte little-endian length of the zlib-compressed UTF-8 JSON index, the index, then the blobs. The index lists
the headers' and entries' (name, header id, offset, length, crc32) in the original order; non-JPEG entries are
stored whole under header id -1.
"""

from __future__ import annotations

import argparse
import json
import struct
import zipfile
import zlib
from pathlib import Path

START_OF_SCAN = b"\xff\xda"


def split_jpeg(data: bytes) -> tuple[bytes, bytes] | None:
    """(header, scan) at the start-of-scan marker, or None for bytes that are not a baseline JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return None
    at = data.find(START_OF_SCAN)
    return (data[:at], data[at:]) if at > 0 else None


def pack(src: Path, dst: Path) -> dict:
    """Write the pack of zip `src` to `dst`; returns {entries, headers, bytes in, bytes out}."""
    headers: dict[bytes, int] = {}
    entries, blobs, offset = [], [], 0
    with zipfile.ZipFile(src) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            data = z.read(info)
            parts = split_jpeg(data)
            header_id, body = (-1, data) if parts is None else (headers.setdefault(parts[0], len(headers)), parts[1])
            entries.append([info.filename, header_id, offset, len(body), info.CRC])
            blobs.append(body)
            offset += len(body)
    header_list = sorted(headers, key=headers.get)
    header_offsets = []
    for h in header_list:
        header_offsets.append([offset, len(h)])
        blobs.append(h)
        offset += len(h)
    index = zlib.compress(json.dumps(dict(format="jpeg-pack", version=1, headers=header_offsets,
                                         entries=entries)).encode(), 9)
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(index)) + index)
        for blob in blobs:
            f.write(blob)
    tmp.replace(dst)
    return dict(entries=len(entries), headers=len(header_list), bytes_in=src.stat().st_size,
                bytes_out=dst.stat().st_size)


def unpack(src: Path, dst: Path) -> int:
    """Rebuild the zip (entries stored uncompressed, as JPEGs gain nothing from deflate); returns the entry count.
    Refuses an existing `dst` and any entry whose CRC-32 differs from the original's."""
    if dst.exists():
        raise SystemExit(f"{dst} exists; unpack into a new path")
    raw = src.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    index = json.loads(zlib.decompress(raw[8:8 + length]))
    if index.get("format") != "jpeg-pack":
        raise SystemExit(f"{src} is not a jpeg pack")
    blobs = memoryview(raw)[8 + length:]
    headers = [bytes(blobs[o:o + n]) for o, n in index["headers"]]
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for name, header_id, offset, size, crc in index["entries"]:
                data = (headers[header_id] if header_id >= 0 else b"") + bytes(blobs[offset:offset + size])
                if zlib.crc32(data) != crc:
                    raise SystemExit(f"{src}: entry {name} does not match its original (CRC-32); pack it again")
                z.writestr(name, data)
    except BaseException:
        tmp.unlink(missing_ok=True)  # ours, half written
        raise
    tmp.replace(dst)
    return len(index["entries"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    print(pack(args.src, args.dst) if args.action == "pack" else f"{unpack(args.src, args.dst)} entries")


if __name__ == "__main__":
    main()
