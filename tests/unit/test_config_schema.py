"""The declarative config schema: README's table is the declarations' table, every
dataclass field is declared, and nested tables / arrays of tables need no special case."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import pytest

from prefork_proxy import config, schema
from prefork_proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _config_table_script():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts/config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_the_generated_one():
    script = _config_table_script()
    readme = (ROOT / "README.md").read_text()
    assert script.readme_table(readme), "README.md lost its config-table markers"
    assert script.readme_table(readme) == script.render(), \
        "README's configuration table is stale: run scripts/config_table.py --write"


@pytest.mark.parametrize("table", [config.SERVER, config.LISTENER, config.HEALTH_CHECK,
                                   config.KEEPALIVE, config.BACKEND, config.ADMIN],
                         ids=lambda t: t.cls.__name__)
def test_every_dataclass_field_is_a_declared_key(table):
    """A field added to a config dataclass without a declaration could never be set."""
    assert {f.name for f in dataclasses.fields(table.cls)} == set(table.names)


def test_every_key_has_docs_and_a_default_in_the_reference():
    for row in config.reference_rows():
        assert row.doc and row.accepts and row.default, row


# A made-up schema with what the next keys bring: an array of tables under an
# array of tables ([[tcp_proxy.routes]]), a dotted sub-table, an inline table.

@dataclass(frozen=True)
class _Limits:
    max_conns: int = 100


@dataclass(frozen=True)
class _Route:
    match: str = ""
    weight: int = 1


@dataclass(frozen=True)
class _Listener:
    bind: str = ""
    routes: Tuple[_Route, ...] = ()
    limits: Optional[_Limits] = None
    keepalive: Optional[_Limits] = None


_ROUTE = schema.Table(_Route, [schema.Key("match", schema.Text(), "sni", missing=""),
                               schema.Key("weight", schema.Int(1, 9), "w")])
_LISTENER = schema.Table(_Listener, [
    schema.Key("bind", schema.Text(), "b"),
    schema.Key("routes", schema.Array(_ROUTE, "routes", "an array of tables"), "r"),
    schema.Key("limits", schema.Table(_Limits, [schema.Key("max_conns", schema.Int(1, 9), "m")]),
               "l"),
    schema.Key("keepalive", schema.Table(_Limits, [schema.Key("max_conns", schema.Int(1, 9),
                                                              "m")], inline=True), "k"),
])


def _load(text: str):
    document = config.tomllib.loads(text)
    source = schema.Source(text, "t.toml")
    return [_LISTENER.build(doc, schema.Where(source, ("tcp_proxy", i), f"tcp_proxy[{i + 1}]"))
            for i, doc in enumerate(document["tcp_proxy"])]


NESTED = """[[tcp_proxy]]
bind = "a"
[[tcp_proxy.routes]]
match = "x"
[[tcp_proxy]]
bind = "b"
[[tcp_proxy.routes]]
match = "y"
[[tcp_proxy.routes]]
match = "z"
weight = {weight}
[tcp_proxy.limits]
max_conns = {max_conns}
"""


def test_arrays_of_tables_and_sub_tables_parse_with_no_special_case():
    first, second = _load(NESTED.format(weight=2, max_conns=3))
    assert first.routes == (_Route("x"),) and first.limits is None
    assert second.routes == (_Route("y"), _Route("z", 2)) and second.limits == _Limits(3)


@pytest.mark.parametrize("text, message", [
    (NESTED.format(weight=0, max_conns=3),
     't.toml:11: tcp_proxy[2]: key "routes[2].weight": expected an integer between 1 and 9, '
     "got an integer 0"),
    (NESTED.format(weight=1, max_conns=0),
     't.toml:13: tcp_proxy[2]: key "limits.max_conns": expected an integer between 1 and 9, '
     "got an integer 0"),
    (NESTED.format(weight=1, max_conns=3).replace('match = "z"', 'mach = "z"'),
     't.toml:10: tcp_proxy[2]: key "routes[2].mach": unknown key: expected one of match, '
     "weight"),
    (NESTED.format(weight=1, max_conns=3).replace('match = "z"\n', ""),
     't.toml:9: tcp_proxy[2]: key "routes[2].match": missing'),
    ('[[tcp_proxy]]\nbind = "a"\nlimits = { max_conns = 10 }\n',
     't.toml:3: tcp_proxy[1]: key "limits.max_conns": expected an integer between 1 and 9, '
     "got an integer 10"),
    ('[[tcp_proxy]]\nbind = "a"\nkeepalive = { max_conns = 10 }\n',
     't.toml:3: tcp_proxy[1]: key "keepalive": max_conns: expected an integer between 1 and '
     "9, got an integer 10"),
    ('[[tcp_proxy]]\nbind = "a"\n\n[tcp_proxy.keepalive]\nmax_conn = 1\n',
     't.toml:5: tcp_proxy[1]: key "keepalive": unknown key "max_conn": expected one of '
     "max_conns"),
    ('[[tcp_proxy]]\nbind = """\n[not.a.header]\nbind = 1\n"""\nlimits = 5\n',
     't.toml:6: tcp_proxy[1]: key "limits": expected a table, got an integer 5'),
])
def test_nested_errors_name_line_and_key(text, message):
    with pytest.raises(ConfigError) as raised:
        _load(text)
    assert str(raised.value) == message


def test_reference_rows_open_a_section_per_dotted_sub_table():
    sections = {(row.section, row.key) for row in schema.rows(_LISTENER, "[[tcp_proxy]]")}
    assert ("[[tcp_proxy.routes]]", "weight") in sections
    assert ("[tcp_proxy.limits]", "max_conns") in sections
    assert ("[[tcp_proxy]]", "keepalive.max_conns") in sections



@dataclass(frozen=True)
class _Endpoint:
    bind: Optional[str] = None
    port: int = 1


_OPTIONAL = schema.Table(_Endpoint, [schema.Key("bind", schema.Text(), "b", missing="expected x"),
                                     schema.Key("port", schema.Int(1, 9), "p")],
                         empty_is_default=True)


def test_an_empty_optional_section_is_its_defaults_and_a_partial_one_needs_its_keys():
    """``[admin]`` alone is off; ``[admin]`` with any key needs ``bind``."""
    source = schema.Source("[admin]\nport = 2\n", "t.toml")
    where = schema.Where(source, ("admin",), "admin")
    assert _OPTIONAL.build({}, where) == _Endpoint()
    assert _OPTIONAL.build({"bind": "a", "port": 2}, where) == _Endpoint("a", 2)
    with pytest.raises(ConfigError, match='^t.toml:1: admin: key "bind": missing: expected x$'):
        _OPTIONAL.build({"port": 2}, where)
