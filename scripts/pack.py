"""Pack train_gpt.py into a self-extracting script for a submission.

The script's bytes count toward the 16,000,000, and the allocator gives every byte the code does not take to the
weights. So the packed file holds the source without its comments and docstrings (strip_prose; pack proves that
what is left parses to the same program), and is one line that decompresses that text (LZMA, base85) and runs
it: it behaves as the source does (its functions' source text included, as stripped), reads and counts its own
(packed) bytes, and embeds them in its logs. Records since #1394 ship their code this way.

    python3 scripts/pack.py train_gpt.py submission/train_gpt.py    # write the packed script
    python3 scripts/pack.py --unpack submission/train_gpt.py         # print the source it holds (stripped)
    python3 scripts/pack.py --keep-prose train_gpt.py out.py         # pack the exact source, comments and all
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import lzma
import re
import sys
import tokenize
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


# What a body that held only a docstring gets instead: the shortest statement that does nothing.
EMPTY_BODY = "..."
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstring_of(node: ast.AST) -> ast.Expr | None:
    """The statement holding node's docstring: the first of a module, class or function body when it is a string
    constant (an f-string is no docstring, and neither is the first string of an if or a loop)."""
    if isinstance(node, DOCUMENTED) and node.body:
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            return first
    return None


def without_docstrings(tree: ast.AST) -> ast.AST:
    """tree with every docstring removed in place, as strip_prose removes them from the text."""
    for node in ast.walk(tree):
        if docstring_of(node) is not None:
            del node.body[0]
            if not node.body and not isinstance(node, ast.Module):
                node.body.append(ast.Expr(ast.Constant(...)))
    return tree


def strip_prose(source: str) -> str:
    """source without its comments and docstrings; every other byte, strings and layout included, stays.

    A shebang on line 1 stays; a coding line goes (the loader decodes the text as UTF-8 whatever it says). A body
    that held only a docstring gets `...`. Lines left holding only whitespace go; no code line is joined or split,
    so a bracket's continuation lines and a backslash's keep working."""
    lines = io.StringIO(source).readlines()  # split as tokenize splits: at \n only
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(row: int, col: int) -> int:
        return starts[row - 1] + col

    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.ENCODING, tokenize.ENDMARKER)]
    removed = bytearray(len(source))  # 1 where a character goes
    inserted: dict[int, str] = {}
    for token in tokens:
        if token.type != tokenize.COMMENT or (token.start == (1, 0) and token.string.startswith("#!")):
            continue
        line = lines[token.start[0] - 1]
        # The blanks before it go too; only code or the line's start can precede a comment on its line.
        begin = len(line[:token.start[1]].rstrip(" \t"))
        removed[offset(token.start[0], begin):offset(*token.end)] = b"\1" * (token.end[1] - begin)

    # ast counts columns in UTF-8 bytes, tokenize in characters.
    def position(row: int, byte_col: int) -> tuple[int, int]:
        return row, len(lines[row - 1].encode("utf-8")[:byte_col].decode("utf-8"))

    index = {token.start: i for i, token in enumerate(tokens)}
    ends = {token.end: i for i, token in enumerate(tokens)}
    skip = (tokenize.NL, tokenize.COMMENT)
    for node in ast.walk(ast.parse(source)):
        doc = docstring_of(node)
        if doc is None:
            continue
        first = index.get(position(doc.lineno, doc.col_offset))
        last = ends.get(position(doc.end_lineno, doc.end_col_offset))
        if first is None or last is None:
            raise ValueError(f"the docstring on line {doc.lineno} does not start and end at tokens")
        # Parentheses around it belong to the statement (Python versions differ on whether ast counts them).
        while True:
            before, after = first - 1, last + 1
            while before >= 0 and tokens[before].type in skip:
                before -= 1
            while after < len(tokens) and tokens[after].type in skip:
                after += 1
            if before < 0 or after >= len(tokens) or tokens[before].string != "(" or tokens[after].string != ")":
                break
            first, last = before, after
        begin, end = offset(*tokens[first].start), offset(*tokens[last].end)
        following = last + 1
        while following < len(tokens) and tokens[following].type == tokenize.COMMENT:
            following += 1
        if following < len(tokens) and tokens[following].string == ";":
            # `"doc"; x = 1` leaves `x = 1`: the semicolon and the blanks up to the next statement go as well.
            end = offset(*tokens[following].end)
            while end < len(source) and source[end] in " \t":
                end += 1
        removed[begin:end] = b"\1" * (end - begin)
        if len(node.body) == 1 and not isinstance(node, ast.Module):
            inserted[begin] = EMPTY_BODY

    kept, line, touched = [], [], False
    for i, char in enumerate(source):
        if i in inserted:
            line.append(inserted[i])
        if removed[i]:
            touched = True  # a removed newline (inside a docstring) joins its line to the next: both were prose
            continue
        line.append(char)
        if char == "\n":
            text = "".join(line)
            if not (touched and text.isspace()):
                kept.append(text)
            line, touched = [], False
    text = "".join(line)
    if text and not (touched and text.isspace()):
        kept.append(text)
    return "".join(kept)


def same_program(source: str, stripped: str) -> None:
    """Raise ValueError unless stripped parses to source's syntax tree less its docstrings: then it is the same
    program, whatever strip_prose did to the text."""
    try:
        got = ast.dump(ast.parse(stripped))
    except SyntaxError as e:
        raise ValueError(f"the source without comments and docstrings does not parse: {e}") from None
    want = ast.dump(without_docstrings(ast.parse(source)))
    if got != want:
        at = next(i for i, (a, b) in enumerate(zip(got + "\0", want + "\0")) if a != b)
        raise ValueError(f"removing comments and docstrings changed the program: its syntax tree reads "
                         f"...{got[max(0, at - 80):at + 80]}... where the source's reads "
                         f"...{want[max(0, at - 80):at + 80]}...")


def packed_source(source: bytes, strip: bool = True) -> bytes:
    """The bytes a packed script holds (and --unpack prints): source less its comments and docstrings, or with
    strip=False source itself. Raises ValueError on a source the loader would run differently."""
    compile(source, "source", "exec")  # only valid Python is worth packing
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the source is not UTF-8 ({e}); the loader decodes it as UTF-8") from None
    odd = sorted({repr(c) for c in text if c in ODD_LINE_BREAKS or c == "\ufeff"})
    if odd:
        raise ValueError(f"the source holds {', '.join(odd)}: only \\n may end a line, and no byte-order mark")
    if not strip:
        return source
    stripped = strip_prose(text)
    same_program(text, stripped)
    return stripped.encode("utf-8")


def wrap(held: bytes) -> bytes:
    """The one-line script that decompresses `held` and runs it."""
    return LOADER.format(base64.b85encode(lzma.compress(held, preset=9 | lzma.PRESET_EXTREME)).decode()).encode()


def pack(source: bytes, strip: bool = True) -> bytes:
    return wrap(packed_source(source, strip))


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
    parser.add_argument("--keep-prose", action="store_true",
                        help="pack the exact source, comments and docstrings included (costs bytes)")
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
    held = packed_source(source, strip=not args.keep_prose)
    packed = wrap(held)
    if unpack(packed) != held:
        raise RuntimeError("the packed script does not decompress to the source it should hold")
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    args.dest.write_bytes(packed)
    prose = "" if args.keep_prose else f", {len(held):,} without comments and docstrings"
    print(f"{args.dest}: {len(packed):,} bytes (the source: {len(source):,}{prose}); "
          f"{len(source) - len(packed):,} bytes more for the weights")


if __name__ == "__main__":
    main()
