"""The local corpus: real text that every Linux machine with Python already has (the
standard library's sources and docstrings, /usr/share/doc, man pages), written as
Pile-format jsonl.zst shards so the quickstart needs no download."""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

_STDLIB = Path(sysconfig.get_paths()["stdlib"])
_DEBIAN_DOC = Path("/usr/share/doc")
_MAN = Path("/usr/share/man")


def python_stdlib_files() -> list[Path]:
    """The installation's own standard-library sources, minus test suites, vendored
    packages and generated codec tables (which teach nothing but hex literals)."""
    root = _STDLIB
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
    return _walk(root, lambda rel: rel.suffix == ".py" and not rel.name.startswith("test_"),
                 skip_dir=lambda name: name in skip_dirs)


def debian_doc_files() -> list[Path]:
    # Markup and images are skipped by name; binaries that slip through fail the
    # UTF-8/NUL check in _read_text.
    skip = {".html", ".htm", ".css", ".js", ".svg", ".xml", ".png", ".gif", ".jpg", ".pdf", ".ps", ".ico"}
    return _walk(_DEBIAN_DOC, lambda rel: Path(rel.name.removesuffix(".gz")).suffix.lower() not in skip)


def man_page_files() -> list[Path]:
    # English pages only: /usr/share/man/man1..man8 (translations live in <lang>/manN).
    return _walk(_MAN, lambda rel: len(rel.parts) == 2 and re.fullmatch(r"man[1-8]", rel.parts[0]) is not None)


def docstring_document(path: Path) -> str | None:
    """One document per module: the module, class and function docstrings with their
    names and signatures, in source order (a text about code, unlike the code itself)."""
    source = _read_text(path)
    if source is None:
        return None
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    module = _module_name(path)
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(f"Module {module}\n\n{doc}")

    def visit(node, prefix: str) -> None:
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if doc := ast.get_docstring(child):
                    if isinstance(child, ast.ClassDef):
                        parts.append(f"class {name}\n\n{doc}")
                    else:
                        parts.append(f"def {name}({ast.unparse(child.args)})\n\n{doc}")
                if isinstance(child, ast.ClassDef):
                    visit(child, name + ".")

    visit(tree, f"{module}.")
    return "\n\n\n".join(parts) if parts else None


def _module_name(path: Path) -> str:
    try:
        parts = path.relative_to(_STDLIB).with_suffix("").parts
    except ValueError:
        parts = path.with_suffix("").parts[-1:]
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def man_page_text(path: Path) -> str | None:
    """A cheap de-roff: keep the text of the common man/mdoc macros, drop requests,
    macro definitions, comments and font escapes (no groff needed)."""
    source = _read_text(path)
    if source is None:
        return None
    lines, in_definition = [], False
    for line in source.splitlines():
        if in_definition:
            in_definition = not line.startswith("..")
            continue
        if line.startswith((".de ", ".de1 ", ".am ")):
            in_definition = True
            continue
        if re.fullmatch(r"\\[{}]\\?\s*", line):  # the braces of a multi-line conditional
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro in _TEXT_MACROS and args:
                lines.append(args.replace('"', "") if macro in ("SH", "SS", "TH") else args)
            elif macro in ("PP", "P", "LP", "TP", "Sh", "Pp", "sp", "br"):
                lines.append("")
            continue
        lines.append(line)
    text = "\n".join(lines)
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


_TEXT_MACROS = {"SH", "SS", "TH", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "IP", "SM", "Nm", "Nd", "Sh",
                "Ss", "Fl", "Ar", "Op", "Xr", "It", "Pa", "Em", "Dq", "Ql", "Sy", "Li", "Cm", "Ev", "Va"}
_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[-+]?\d+"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), '"'),  # strings (mostly quotes)
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), r"\\"),
    (re.compile(r"\\[&|^%c:]"), ""),
    (re.compile(r"\\ "), " "),
]


@dataclass(frozen=True)
class LocalSubset:
    list_files: Callable[[], list[Path]]
    make_document: Callable[[Path], str | None]  # None: skip this file
    # Files of one family (a package, a command suite) share a cap, so that e.g. the
    # sixteen thousand `gcloud` man pages cannot crowd out every other command.
    family: Callable[[Path], str]


# Order matters: a subset that cannot fill its share hands the rest on to the ones
# after it, so the scarcest (docstrings) goes first.
LOCAL_SUBSETS: dict[str, LocalSubset] = {
    "python-docstrings": LocalSubset(python_stdlib_files, lambda path: docstring_document(path),
                                     lambda path: path.relative_to(_STDLIB).parts[0].removesuffix(".py")),
    "python-stdlib-code": LocalSubset(python_stdlib_files, lambda path: _read_text(path),
                                      lambda path: path.relative_to(_STDLIB).parts[0].removesuffix(".py")),
    "debian-docs": LocalSubset(debian_doc_files, lambda path: _read_text(path),
                               lambda path: path.relative_to(_DEBIAN_DOC).parts[0]),
    "man-pages": LocalSubset(man_page_files, lambda path: man_page_text(path),
                             lambda path: re.split(r"[-_.]", path.name, maxsplit=1)[0]),
}


def build_local_corpus(out_dir: str | os.PathLike, max_mb: float, subsets: list[str] | None = None,
                       min_doc_bytes: int = 500, max_doc_bytes: int = 256 * 1024,
                       family_fraction: float = 0.1) -> dict:
    """Write `<out_dir>/<subset>.jsonl.zst` for each subset, about `max_mb` MB of text in all.

    Each subset gets an equal share of what is left, and one family at most
    `family_fraction` of that share. Files are taken in a fixed pseudo-random order (a
    hash of their path) so a share samples the whole source, not its alphabetical start.
    Exact duplicates (e.g. the many copies of the GPL) are kept once.
    Returns {"subsets": {name: {"docs", "bytes", "file"}}, "bytes": total}.
    """
    names = list(LOCAL_SUBSETS) if subsets is None else subsets
    unknown = [name for name in names if name not in LOCAL_SUBSETS]
    if unknown:
        raise ValueError(f"unknown local subset {unknown[0]!r} (known: {', '.join(LOCAL_SUBSETS)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = int(max_mb * 1e6)
    seen: set[bytes] = set()
    summary = {"subsets": {}, "bytes": 0}
    for position, name in enumerate(names):
        subset = LOCAL_SUBSETS[name]
        share = (budget - summary["bytes"]) // (len(names) - position)
        family_cap = max(family_fraction * share, max_doc_bytes)
        family_bytes: dict[str, int] = {}
        shard = out_dir / f"{name}.jsonl.zst"
        docs = written = 0
        with open(shard, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as writer:
            misses = 0  # documents in a row that did not fit what is left of the share
            for path in sorted(subset.list_files(), key=_path_order):
                if share - written < min_doc_bytes or misses >= 50:
                    break
                family = subset.family(path)
                if family_bytes.get(family, 0) >= family_cap:
                    continue
                text = subset.make_document(path)
                if text is None:
                    continue
                data = text.encode("utf-8")
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if not min_doc_bytes <= len(data) <= max_doc_bytes or digest in seen:
                    continue
                if written + len(data) > share:
                    misses += 1  # a smaller document may still fit
                    continue
                misses = 0
                seen.add(digest)
                record = {"text": text, "meta": {"pile_set_name": name}}
                writer.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
                docs += 1
                written += len(data)
                family_bytes[family] = family_bytes.get(family, 0) + len(data)
        summary["subsets"][name] = {"docs": docs, "bytes": written, "file": shard.name}
        summary["bytes"] += written
    return summary


def _walk(root: Path, keep: Callable[[Path], bool], skip_dir: Callable[[str], bool] = lambda name: False
          ) -> list[Path]:
    """Regular files under root (relative-path filter `keep`), in sorted order, no symlinks;
    directories named so that `skip_dir` is true are not entered at all."""
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not skip_dir(name))
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            if not path.is_symlink() and keep(path.relative_to(root)):
                found.append(path)
    return found


def _path_order(path: Path) -> bytes:
    return hashlib.blake2b(str(path).encode("utf-8", "surrogateescape"), digest_size=8).digest()


def _read_text(path: Path) -> str | None:
    """A file's text (gunzipped if .gz), or None for binaries and non-UTF-8 files:
    the local corpus is curated, so such files are skipped, never guessed at."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.GzipFile(fileobj=io.BytesIO(data)).read(4 * 1024 * 1024)
        if b"\x00" in data:
            return None
        return data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
        return None
