"""Declarative config schema: keys declared once drive validation, messages, defaults and docs.

Owned by ``config``, which declares the proxy's sections and keys with these
types; this module knows nothing of the proxy.  Called only in the master (at
start, on every reload) and by ``prefork-proxy check``; never on a hot path.

Vocabulary:

- a ``Kind`` reads one value: ``parse`` returns the typed value or raises
  ``Invalid``; ``expected`` is the phrase used both in error messages
  ("expected <phrase>, got ...") and in README's configuration table;
- a ``Key`` is one name in a table: its kind, whether it is required, its doc;
  its default is the dataclass field's (the dataclasses stay the typed model
  other modules use), unless ``default_from`` derives it from other keys;
- a ``Table`` is a set of keys building one frozen dataclass, plus cross-key
  checks (plain functions over the built object that raise ``Invalid`` naming
  the key at fault).  A table is itself a ``Kind``, so sub-tables
  (``[tcp_proxy.health_check]``, inline tables, ``backends`` items) nest with
  no special case;
- an ``Array`` is a list of one kind (strings, tables, or both).

Every error is a ``ConfigError`` of one line: ``file:line: section: key "k":
message``.  A ``Where`` carries the section label, the key as shown, a prefix
for values written inline (``backends[2]: weight: ``) and the document path
(``("tcp_proxy", 0, "health_check", "rise")``) whose line ``Lines`` finds.
Two styles of nesting keep today's messages: a *dotted* table names its keys
``health_check.rise``; an *inline* one keeps the parent key and prefixes the
detail (``key "tcp_keepalive": idle_s: expected ...``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import ChainMap
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from prefork_proxy.errors import ConfigError

Path = Tuple[Union[str, int], ...]


class Invalid(Exception):
    """A value (or a combination of values) that breaks its declaration.

    ``key`` names the key at fault when a table's cross-key check raises it.
    """

    def __init__(self, message: str, key: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


def describe(value: Any) -> str:
    """How an error message shows a wrong value: its TOML type and the value itself."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    kind = next((name for t, name in kinds.items() if type(value) is t), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} {shown}"


def is_int_between(value: Any, low: int, high: int) -> bool:
    """An integer (not a boolean) in [low, high]."""
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def check_seconds(value: Any, low: float, high: float) -> Optional[float]:
    """``value`` as a float if it is a finite number of seconds in [low, high], else None.

    Booleans are not numbers here (TOML ``true`` is not 1 second); ``nan`` and
    ``inf`` fail every comparison's intent, so they are rejected explicitly.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or not low <= seconds <= high:
        return None
    return seconds


# --------------------------------------------------------------------------- where


class Lines:
    """Line numbers of tables and keys in the raw TOML text, by document path.

    ``tomllib`` reports lines only for syntax errors, so the text is scanned:
    ``[a.b]`` and ``[[a.b]]`` headers (an array of tables counts its elements,
    and a header under it belongs to its latest element, as in TOML), and
    ``key =`` / ``dotted.key =`` lines.  Built on the first error only.
    """

    _SEGMENT = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
    _DOTTED = _SEGMENT + r"(?:\s*\.\s*" + _SEGMENT + r")*"
    _ARRAY = re.compile(r"^\s*\[\[\s*(" + _DOTTED + r")\s*\]\]\s*(#.*)?$")
    _TABLE = re.compile(r"^\s*\[\s*(" + _DOTTED + r")\s*\]\s*(#.*)?$")
    _KEY = re.compile(r"^\s*(" + _DOTTED + r")\s*=")

    def __init__(self, text: str) -> None:
        self.tables: Dict[Path, int] = {}
        self.keys: Dict[Path, int] = {}
        arrays: Dict[Path, int] = {}  # array-of-tables path -> elements seen
        current: Path = ()
        in_string = False  # inside a multi-line string: nothing there is a key
        for number, line in enumerate(text.splitlines(), 1):
            # A line that opens or closes a multi-line string: only its start can be a key.
            odd = (line.count('"""') + line.count("'''")) % 2 == 1
            if in_string:
                in_string = not odd
                continue
            in_string = odd
            match = self._ARRAY.match(line) or self._TABLE.match(line)
            if match:
                names = self._names(match.group(1))
                path: Path = ()
                for position, name in enumerate(names):
                    path += (name,)
                    if match.re is self._ARRAY and position == len(names) - 1:
                        arrays[path] = arrays.get(path, 0) + 1
                    if path in arrays:  # inside an array of tables: its latest element
                        path += (arrays[path] - 1,)
                self.tables.setdefault(path, number)
                current = path
                continue
            match = self._KEY.match(line)
            if match:
                path = current
                for name in self._names(match.group(1)):
                    path += (name,)
                    self.keys.setdefault(path, number)

    @classmethod
    def _names(cls, dotted: str) -> List[str]:
        return [name.strip("\"'") for name in re.findall(cls._SEGMENT, dotted)]

    def find(self, path: Path, *, header_only: bool = False) -> Optional[int]:
        """Line of ``path``, or of the nearest enclosing key or table written in the text."""
        if header_only:
            return self.tables.get(path)
        while path:
            line = self.keys.get(path) or self.tables.get(path)
            if line:
                return line
            path = path[:-1]
        return None


class Source:
    """The text being validated and its name in messages (a file path, "command line")."""

    def __init__(self, text: str, name: str) -> None:
        self.text = text
        self.name = name
        self._lines: Optional[Lines] = None

    def line(self, path: Path, header_only: bool) -> Optional[int]:
        if self._lines is None:
            self._lines = Lines(self.text)
        return self._lines.find(path, header_only=header_only)


@dataclass(frozen=True)
class Where:
    """A place in the document, as messages name it (see the module docstring)."""

    source: Source
    path: Path
    section: str
    key: str = ""
    prefix: str = ""

    def fail(self, message: str) -> ConfigError:
        # A section's own error points at its header (``server = 5`` has none).
        line = self.source.line(self.path, header_only=not self.key)
        where = f"{self.source.name}:{line}" if line else self.source.name
        key_part = f": key \"{self.key}\"" if self.key else ""
        return ConfigError(f"{where}: {self.section}{key_part}: {self.prefix}{message}")

    def field(self, name: str, inline: bool) -> "Where":
        """The place of key ``name`` of the table here (``inline``: a value written inline)."""
        path = self.path + (name,)
        if not self.key:
            return dataclasses.replace(self, path=path, key=name)
        if inline or self.prefix:  # below an inline value everything is its detail
            return dataclasses.replace(self, path=path, prefix=f"{self.prefix}{name}: ")
        return dataclasses.replace(self, path=path, key=f"{self.key}.{name}")

    def item(self, index: int, label: str, inline: bool) -> "Where":
        """The place of element ``index`` (from 0) of the array ``label`` here.

        ``inline``: ``key "backends": backends[2]: ...``; else (an array of
        tables, ``[[tcp_proxy.routes]]``) ``key "routes[2].match": ...``.
        """
        path = self.path + (index,)
        if inline or self.prefix:
            return dataclasses.replace(self, path=path,
                                       prefix=f"{self.prefix}{label}[{index + 1}]: ")
        return dataclasses.replace(self, path=path, key=f"{self.key}[{index + 1}]")


# --------------------------------------------------------------------------- kinds


class Kind:
    """How one value is read.  ``expected`` is the phrase for messages and docs."""

    expected = "a value"

    def parse(self, value: Any, where: Where) -> Any:
        raise NotImplementedError

    def read(self, value: Any, where: Where) -> Any:
        """``parse``, with an ``Invalid`` turned into a located ``ConfigError``."""
        try:
            return self.parse(value, where)
        except Invalid as exc:
            raise where.fail(exc.message) from None

    def wrong(self, value: Any) -> Invalid:
        return Invalid(f"expected {self.expected}, got {describe(value)}")


class Int(Kind):
    """An integer in [low, high] (booleans are not integers here)."""

    def __init__(self, low: int, high: int, unit: str = "", note: str = "") -> None:
        self.low, self.high = low, high
        self.expected = (f"an integer{f' number of {unit}' if unit else ''} between {low} and "
                         f"{high}{f' ({note})' if note else ''}")

    def parse(self, value: Any, where: Where) -> int:
        if not is_int_between(value, self.low, self.high):
            raise self.wrong(value)
        return value


class Seconds(Kind):
    """A finite number of seconds in [low, high], as a float."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.expected = f"a number of seconds between {low:g} and {high:g}"

    def parse(self, value: Any, where: Where) -> float:
        seconds = check_seconds(value, self.low, self.high)
        if seconds is None:
            raise self.wrong(value)
        return seconds


class OneOf(Kind):
    """One of a few strings."""

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)
        self.expected = "one of " + ", ".join(f'"{c}"' for c in self.choices)

    def parse(self, value: Any, where: Where) -> str:
        if value not in self.choices:
            raise self.wrong(value)
        return value


class Auto(Kind):
    """``"auto"`` (read as None: the program decides) or a value of ``kind``."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.expected = f'"auto" or {kind.expected}'

    def parse(self, value: Any, where: Where) -> Any:
        if value == "auto":
            return None
        try:
            return self.kind.parse(value, where)
        except Invalid:
            raise self.wrong(value) from None


class Text(Kind):
    """A string; ``non_empty`` refuses ""; ``encode`` reads it as UTF-8 bytes."""

    def __init__(self, non_empty: bool = True, note: str = "", encode: bool = False) -> None:
        self.non_empty, self.encode = non_empty, encode
        self.expected = (f"{'a non-empty' if non_empty else 'a'} string"
                         f"{f' ({note})' if note else ''}")

    def parse(self, value: Any, where: Where) -> Any:
        if not isinstance(value, str) or (self.non_empty and not value):
            raise self.wrong(value)
        return value.encode("utf-8") if self.encode else value


class Flag(Kind):
    expected = "true or false"

    def parse(self, value: Any, where: Where) -> bool:
        if not isinstance(value, bool):
            raise self.wrong(value)
        return value


@dataclass(frozen=True)
class Key:
    """One key of a table: its name, kind and doc; the dataclass field gives the default.

    ``missing`` makes it required (the text follows "missing: ").  ``default_doc``
    describes a default that is not a plain value (None, computed).
    ``default_from`` derives the default from the keys read before it.
    """

    name: str
    kind: Kind
    doc: str
    missing: Optional[str] = None
    default_doc: str = ""
    default_from: Optional[Callable[[Mapping[str, Any]], Any]] = None

    @property
    def required(self) -> bool:
        return self.missing is not None


Check = Callable[[Any], None]


class Table(Kind):
    """A table of declared keys building ``cls``; nests as a value of another table.

    ``inline``: its keys are shown as a prefix of the parent key's message (for
    values written inline), else as ``parent.key``.  ``flag``: ``true`` stands
    for a table of defaults and ``false`` for None.  ``shorthand``: a string
    stands for a table with only that key.  ``empty_is_default``: an empty
    table is the defaults (its required keys are required once it has any key,
    as ``[admin]`` alone is off).  ``checks`` run on the built object.
    """

    def __init__(self, cls: type, keys: Sequence[Key], *, expected: str = "a table",
                 inline: bool = False, flag: bool = False, shorthand: Optional[str] = None,
                 empty_is_default: bool = False, checks: Sequence[Check] = ()) -> None:
        self.cls, self.keys = cls, tuple(keys)
        self.empty_is_default = empty_is_default
        self.expected, self.inline, self.flag = expected, inline, flag
        self.shorthand, self.checks = shorthand, tuple(checks)
        self.names = tuple(k.name for k in self.keys)
        fields = {f.name for f in dataclasses.fields(cls)}
        # Plain field defaults, what ``default_from`` sees for keys not written.
        self.defaults = {f.name: f.default for f in dataclasses.fields(cls)
                         if f.default is not dataclasses.MISSING}
        undeclared = [n for n in self.names if n not in fields]
        assert not undeclared, f"{cls.__name__} has no field for {undeclared}"

    def key(self, name: str) -> Key:
        return next(k for k in self.keys if k.name == name)

    def parse(self, value: Any, where: Where) -> Any:
        if self.flag and isinstance(value, bool):
            return self.cls() if value else None
        if self.shorthand is not None and isinstance(value, str):
            return self.cls(**{self.shorthand: self.key(self.shorthand).kind.read(value, where)})
        if not isinstance(value, dict):
            raise self.wrong(value)
        return self.build(value, where)

    def build(self, doc: Mapping[str, Any], where: Where) -> Any:
        """Validate ``doc`` key by key, build the dataclass, run the cross-key checks."""
        for name in doc:
            if name not in self.names:
                choices = ", ".join(self.names)
                if self.inline:  # the parent key, the line of the unknown one
                    at = dataclasses.replace(where, path=where.path + (name,))
                    raise at.fail(f"unknown key \"{name}\": expected one of {choices}")
                raise where.field(name, False).fail(f"unknown key: expected one of {choices}")
        if not doc and self.empty_is_default:
            return self.cls()
        values: Dict[str, Any] = {}
        for key in self.keys:
            if key.name in doc:
                values[key.name] = key.kind.read(doc[key.name], where.field(key.name,
                                                                            self.inline))
            elif key.default_from is not None:
                values[key.name] = key.default_from(ChainMap(values, self.defaults))
            elif key.required:
                if self.inline:
                    raise where.fail(f"missing \"{key.name}\"" +
                                     (f": {key.missing}" if key.missing else ""))
                raise where.field(key.name, False).fail(
                    "missing" + (f": {key.missing}" if key.missing else ""))
        built = self.cls(**values)
        for check in self.checks:
            try:
                check(built)
            except Invalid as exc:
                at = where.field(exc.key, self.inline) if exc.key else where
                raise at.fail(exc.message) from None
        return built

    def default_text(self, key: Key) -> str:
        """The default of ``key`` as README shows it."""
        if key.default_doc or key.required:
            return key.default_doc or "required"
        field = next(f for f in dataclasses.fields(self.cls) if f.name == key.name)
        return toml_value(field.default)


class Array(Kind):
    """A non-empty array of ``item`` values, as a tuple; ``label`` names its items."""

    def __init__(self, item: Kind, label: str, expected: str) -> None:
        self.item, self.label, self.expected = item, label, expected

    def parse(self, value: Any, where: Where) -> tuple:
        if not isinstance(value, list) or not value:
            raise self.wrong(value)
        inline = not isinstance(self.item, Table) or self.item.inline
        return tuple(self.item.read(v, where.item(n, self.label, inline))
                     for n, v in enumerate(value))


def toml_value(value: Any) -> str:
    """A default as it would be written in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bytes):
        return '""' if not value else repr(value.decode())
    return str(value)


# --------------------------------------------------------------------------- docs


@dataclass(frozen=True)
class Row:
    """One line of the configuration reference: where, which key, what it takes."""

    section: str
    key: str
    accepts: str
    default: str
    doc: str


def rows(table: Table, section: str, prefix: str = "") -> Iterator[Row]:
    """Every key of ``table`` (and of the tables nested in it), in declaration order.

    A dotted sub-table opens its own section (``[tcp_proxy.health_check]``);
    an inline one lists its keys as ``parent.key`` under the parent's section.
    """
    nested: List[Tuple[str, Table]] = []
    for key in table.keys:
        yield Row(section, prefix + key.name, key.kind.expected, table.default_text(key),
                  key.doc)
        many = isinstance(key.kind, Array)
        inner = key.kind.item if isinstance(key.kind, Array) else key.kind
        if isinstance(inner, Table):
            if inner.inline:
                yield from rows(inner, section, prefix + key.name + ("[]." if many else "."))
            else:
                name = f"{section.strip('[]')}.{prefix}{key.name}"
                nested.append((f"[[{name}]]" if many else f"[{name}]", inner))
    for header, inner in nested:
        yield from rows(inner, header)
