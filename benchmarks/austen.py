"""Write Jane Austen's *Pride and Prejudice* as plain text, from Debian's r-cran-janeaustenr.

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb /tmp/ja
    python benchmarks/austen.py /tmp/ja /tmp/pride.txt

The second English text of the cache-quality measurements (benchmarks/README.md): prose
that is not jargon, available offline from the Debian archive without installing R. The
package keeps each novel as an R character vector (one line of the book per element) in
a lazy-load database, data/Rdata.rdb: zlib-compressed records, each a serialized STRSXP.
"""
from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def records(data: bytes):
    """The decompressed records of a lazy-load .rdb: [4-byte length][zlib stream] ..."""
    off = 0
    while off < len(data):
        d = zlib.decompressobj()
        out = d.decompress(data[off + 4:])
        yield out
        off = len(data) - len(d.unused_data)


def lines(record: bytes) -> list[str]:
    """One serialized character vector (R XDR format, version 3) -> its strings."""
    p = 2 + 12  # "X\n", format version, writer version, minimal reader version
    enc_len = struct.unpack(">i", record[p:p + 4])[0]
    p += 4 + enc_len  # native encoding name
    flags, n = struct.unpack(">ii", record[p:p + 8])
    if flags & 0xFF != 16:
        raise ValueError("not a character vector")
    p += 8
    out = []
    for _ in range(n):
        _, size = struct.unpack(">ii", record[p:p + 8])
        p += 8
        if size < 0:  # NA
            out.append("")
            continue
        out.append(record[p:p + size].decode("utf-8", "replace"))
        p += size
    return out


def main() -> None:
    root, dest = Path(sys.argv[1]), Path(sys.argv[2])
    for rec in records((root / RDB).read_bytes()):
        book = lines(rec)
        if book and book[0] == "PRIDE AND PREJUDICE":
            dest.write_text("\n".join(book) + "\n", encoding="utf-8")
            print(f"{dest}: {len(book)} lines")
            return
    raise SystemExit("Pride and Prejudice not found in the package")


if __name__ == "__main__":
    main()
