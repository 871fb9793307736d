"""Reading configuration YAML safely: bounded size and nesting, no aliases, anchors or tags.

A kvtier config is a small mapping of mappings of scalars, read from a file an operator wrote or
from an environment variable. PyYAML's `safe_load` is safe against code execution but not against
cost: a ~1 KB file of nested aliases expands to gigabytes (a "billion laughs"), 5,000 nested `[`
overflow the Python stack, a 5,000-digit integer or `!!int x` raise ValueError, `!!timestamp x`
raises AttributeError. So every config text goes through `parse_yaml`, which

1. bounds the text to `MAX_CONFIG_BYTES` before anything parses it;
2. walks the event stream once (libyaml's parser: iterative, fast) and refuses aliases, anchors,
   explicit tags (`!!int`, `!foo`), nesting deeper than `MAX_CONFIG_DEPTH` and more than
   `MAX_CONFIG_NODES` values -- none of which a config needs; the recursive composer could not
   survive deep nesting, and the node bound keeps the worst case to milliseconds, not the seconds
   that building 300,000 list items from a full-size file takes;
3. builds the value with a resolver that knows only null, bool, int and float (a date stays text),
   refuses integers longer than `MAX_INT_CHARS`, numbers PyYAML's patterns admit but Python does
   not ("0x_"), and duplicate keys.

Every failure is a `ConfigError` naming `where` and the line and column. Messages carry libyaml's
problem description, never the text itself: a value may be a secret.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from kvtier.config_values import show_key
from kvtier.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config file or one environment value; shipped configs are ~3 KB
MAX_CONFIG_DEPTH = 32  # nested collections; a config uses 2 (top level, section)
MAX_CONFIG_NODES = 10_000  # scalars and collections; a shipped config has about 50
MAX_INT_CHARS = 40  # an integer's text, underscores and sign included; int64 needs 20

# libyaml when present (about 5x faster); PyYAML's pure-Python parser behaves the same otherwise.
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _Loader(_SafeLoader):  # type: ignore[misc, valid-type]
    """`safe_load` minus timestamps, with bounded integers and duplicate keys refused."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # int() of a long digit string raises ValueError (3.11's 4,300-digit guard) or costs time.
        if len(node.value) > MAX_INT_CHARS:
            raise ConstructorError(None, None, f"integer longer than {MAX_INT_CHARS} characters",
                                   node.start_mark)
        _refuse_ambiguous(node)
        return _number(super().construct_yaml_int, node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        _refuse_ambiguous(node)
        return _number(super().construct_yaml_float, node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # YAML keeps the last of two equal keys; in a config that hides a mistake (two `token:`).
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    # The name part only: a "key" like `token s3cret` is a value that lost its colon.
                    shown = show_key(key_node.value)
                    shown = repr(shown) if shown == key_node.value else shown
                    raise ConstructorError(None, None, f"duplicate key {shown}",
                                           key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


_OCTAL = re.compile(r"[-+]?0[0-7_]+")


def _refuse_ambiguous(node: yaml.ScalarNode) -> None:
    """YAML 1.1 reads `port: 07000` as octal (3584) and `1:20` as base 60 (80): numbers nobody
    meant, which would load without a word. Refused, with how to write what was meant."""
    if _OCTAL.fullmatch(node.value):
        raise ConstructorError(None, None, "a number with a leading 0 is octal in YAML 1.1 (017 is 15); "
                               "write it without the leading 0", node.start_mark)
    if ":" in node.value:
        raise ConstructorError(None, None, "a number with ':' is base 60 in YAML 1.1; quote it if it is "
                               "text", node.start_mark)


def _number(construct: Any, node: yaml.ScalarNode) -> Any:
    try:
        return construct(node)
    except ValueError as exc:  # PyYAML's int pattern admits "0x_" and "0b_", which int() refuses
        raise ConstructorError(None, None, "not a valid number", node.start_mark) from exc


def read_config_file(source: str) -> Any:
    """The parsed YAML of config file `source` (a regular file, at most MAX_CONFIG_BYTES, UTF-8)."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever; it is refused below.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from exc
    except ValueError as exc:  # an embedded NUL
        raise ConfigError(f"{source!r}: cannot read config file: {exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{source}: cannot read config file: not a regular file")
        data = b""
        while len(data) <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start})") from exc
    return parse_yaml(text, source)


def parse_yaml(text: str, where: str) -> Any:
    """The value of one YAML document `text`; ConfigError naming `where` on any problem."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate: os.environ's stand-in for a non-UTF-8 byte
        raise ConfigError(f"{where}: not UTF-8 text (at character {exc.start})") from exc
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: longer than {MAX_CONFIG_BYTES} bytes")
    try:
        _check_events(text)
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML{_describe(exc)}") from exc


def _check_events(text: str) -> None:
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_CONFIG_NODES:
                _refuse(f"more than {MAX_CONFIG_NODES} values", event)
        if isinstance(event, yaml.AliasEvent):
            _refuse("aliases (*name) are not allowed", event)
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            _refuse("anchors (&name) are not allowed", event)
        if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)) and event.tag is not None:
            _refuse("tags (!name, !!type) are not allowed", event)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                _refuse(f"nested deeper than {MAX_CONFIG_DEPTH} levels", event)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _refuse(problem: str, event: yaml.Event) -> None:
    raise yaml.MarkedYAMLError(problem=problem, problem_mark=event.start_mark)


def _describe(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{at}: {exc.problem or exc.context or 'malformed'}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f" at character {exc.position}: {exc.reason}"
    return ""
