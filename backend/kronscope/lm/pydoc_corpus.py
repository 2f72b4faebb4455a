"""The built-in demo corpus: the Python installation's own documentation, no download.

Documents, in a fixed order: every ``pydoc_data.topics`` entry (sorted by topic), then
one document per module of :data:`MODULES` (module docstring, then the docstrings of its
public classes, their public methods and its public functions, in name order). The total
is cut at :data:`TARGET_CHARS`. Only pure standard-library modules whose import has no
side effects are listed; one that fails to import is skipped. Signatures are left out:
their default values can print memory addresses, which would change the corpus hash.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from functools import cache
from types import ModuleType

TARGET_CHARS = 1_300_000

_MODULE_NAMES = """
        abc argparse ast asyncio asyncio.base_events asyncio.events asyncio.futures asyncio.locks
        asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb binascii bisect
        builtins bz2 calendar cmath cmd code codecs codeop collections collections.abc colorsys
        compileall concurrent.futures configparser contextlib contextvars copy copyreg csv
        dataclasses datetime decimal difflib dis doctest email email.charset email.encoders
        email.generator email.header email.headerregistry email.message email.mime.text
        email.parser email.policy email.utils enum errno filecmp fileinput fnmatch fractions
        ftplib functools gc getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser
        http http.client http.cookiejar http.cookies http.server imaplib importlib importlib.abc
        importlib.machinery importlib.metadata importlib.resources importlib.util inspect io
        ipaddress itertools json json.decoder json.encoder keyword linecache locale logging
        logging.config logging.handlers lzma mailbox marshal math mimetypes multiprocessing
        multiprocessing.pool netrc numbers operator optparse os os.path pathlib pdb pickle
        pickletools pkgutil platform plistlib poplib pprint profile pstats pyclbr pydoc queue
        quopri random re reprlib runpy sched secrets selectors shelve shlex shutil signal smtplib
        socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys
        sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize tomllib
        trace traceback tracemalloc types typing unicodedata unittest unittest.mock urllib.error
        urllib.parse urllib.request urllib.robotparser uuid warnings wave weakref
        wsgiref.handlers wsgiref.simple_server wsgiref.util xml.dom xml.dom.minidom
        xml.dom.pulldom xml.etree.ElementTree xml.parsers.expat xml.sax xml.sax.handler
        xml.sax.saxutils xmlrpc.client xmlrpc.server zipapp zipfile zipimport zlib zoneinfo
"""
MODULES: tuple[str, ...] = tuple(sorted(_MODULE_NAMES.split()))
"""Pure standard-library modules whose import has no side effects."""


def _import(name: str) -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):
        return None


def _doc(obj: object) -> str:
    try:
        return (inspect.getdoc(obj) or "").strip()
    except Exception:
        return ""


def _module_document(module: ModuleType) -> str:
    name = module.__name__
    parts = [f"Module {name}", _doc(module)]
    members = vars(module)
    for attr in sorted(members):
        obj = members[attr]
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            parts.append(f"class {name}.{attr}\n\n{_doc(obj)}")
            for meth in sorted(vars(obj)):
                fn = vars(obj)[meth]
                if not meth.startswith("_") and inspect.isroutine(fn):
                    doc = _doc(fn)
                    if doc:
                        parts.append(f"{name}.{attr}.{meth}\n\n{doc}")
        elif inspect.isroutine(obj):
            doc = _doc(obj)
            if doc:
                parts.append(f"{name}.{attr}\n\n{doc}")
    return "\n\n".join(p for p in parts if p)


@cache
def builtin_documents() -> tuple[str, ...]:
    """The demo corpus, about :data:`TARGET_CHARS` characters, identical on every call."""
    docs: list[str] = []
    topics_module = _import("pydoc_data.topics")  # some distributions strip it
    topics: dict[str, str] = dict(getattr(topics_module, "topics", {}) or {})
    docs.extend(str(topics[k]).strip() for k in sorted(topics))
    for name in MODULES:
        module = _import(name)
        if module is not None:
            with warnings.catch_warnings():  # e.g. typing.io's deprecation, on getdoc
                warnings.simplefilter("ignore")
                docs.append(_module_document(module))
    out: list[str] = []
    total = 0
    for doc in docs:
        if not doc:
            continue
        if total + len(doc) >= TARGET_CHARS:
            rest = doc[: TARGET_CHARS - total].rstrip()
            if rest:
                out.append(rest)
            break
        out.append(doc)
        total += len(doc)
    return tuple(out)
