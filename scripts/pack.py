"""Pack train_gpt.py into a self-extracting script for a submission.

The script's bytes count toward the 16,000,000, and the allocator gives every byte the code does not take to the
weights. The packed file is one line that decompresses the exact source (LZMA, base85) and runs it: it behaves as
the source does (its functions' source text included), reads and counts its own (packed) bytes, and embeds them
in its logs. Records since #1394 ship
their code this way.

    python3 scripts/pack.py train_gpt.py submission/train_gpt.py    # write the packed script
    python3 scripts/pack.py --unpack submission/train_gpt.py         # print the source it holds
"""

from __future__ import annotations

import argparse
import base64
import lzma
import re
import sys
from pathlib import Path

# The source goes into linecache under the script's own name: inspect.getsource then finds the real lines, which
# triton.jit reads to compile a kernel.
LOADER = ('import base64,linecache,lzma;_source=lzma.decompress(base64.b85decode("{}")).decode();'
          'linecache.cache[__file__]=(len(_source),None,_source.splitlines(True),__file__);'
          'exec(compile(_source,__file__,"exec"))\n')
# Scripts packed before the linecache step still unpack (their logs archive them).
EARLIER_LOADERS = ('import base64,lzma;exec(compile(lzma.decompress(base64.b85decode("{}")),__file__,"exec"))\n',)
PACKED = [re.compile(re.escape(loader).replace(re.escape("{}"), '([^"]*)')) for loader in (LOADER, *EARLIER_LOADERS)]
# str.splitlines also breaks at these, the tokenizer does not: linecache's line numbers would shift.
ODD_LINE_BREAKS = "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def pack(source: bytes) -> bytes:
    compile(source, "source", "exec")  # only valid Python is worth packing
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the source is not UTF-8 ({e}); the loader decodes it as UTF-8") from None
    odd = sorted({repr(c) for c in text if c in ODD_LINE_BREAKS or c == "\ufeff"})
    if odd:
        raise ValueError(f"the source holds {', '.join(odd)}: only \\n may end a line, and no byte-order mark")
    return LOADER.format(base64.b85encode(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)).decode()).encode()


def unpack(packed: bytes) -> bytes:
    text = packed.decode("ascii", errors="replace")
    for pattern in PACKED:
        match = pattern.fullmatch(text)
        if match is not None:
            return lzma.decompress(base64.b85decode(match.group(1)))
    raise ValueError("not a script written by scripts/pack.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unpack", action="store_true", help="print the source a packed script holds")
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path, nargs="?")
    args = parser.parse_args()
    if args.unpack:
        sys.stdout.buffer.write(unpack(args.source.read_bytes()))
        return
    if args.dest is None or args.dest.resolve() == args.source.resolve():
        parser.error("give a destination other than the source")
    if args.dest.exists():
        parser.error(f"{args.dest} exists: pack into a new path (nothing is overwritten)")
    source = args.source.read_bytes()
    packed = pack(source)
    if unpack(packed) != source:
        raise RuntimeError("the packed script does not decompress to the source")
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    args.dest.write_bytes(packed)
    print(f"{args.dest}: {len(packed):,} bytes (the source: {len(source):,}); "
          f"{len(source) - len(packed):,} bytes more for the weights")


if __name__ == "__main__":
    main()
