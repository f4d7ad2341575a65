"""YAML loading that keeps file and line of every value, for error messages that point at the input."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from domain.errors import ConfigError


@dataclass(frozen=True)
class Where:
    """A position in a YAML file: path and 1-based line."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


class Located:
    """A parsed YAML mapping that remembers where each key and value came from."""

    def __init__(self, node: yaml.MappingNode, path: str, prefix: str = "") -> None:
        self.path = path
        self.prefix = prefix
        self.where = Where(path, node.start_mark.line + 1)
        self._items: dict[str, yaml.Node] = {}
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in self._items:
                # YAML keeps the last value of a repeated key without a word: a typo's copy would win silently.
                raise ConfigError([f"{path}:{line}: {prefix}{key}: duplicate key (first at line {first[key]})"])
            first[key] = line
            self._items[key] = value_node

    def keys(self) -> list[str]:
        """Return the keys present in this mapping."""
        return list(self._items)

    def has(self, key: str) -> bool:
        """Tell whether the key is present."""
        return key in self._items

    def at(self, key: str) -> Where:
        """Return where the key's value stands (or the mapping itself when absent)."""
        node = self._items.get(key)
        return Where(self.path, node.start_mark.line + 1) if node is not None else self.where

    def name(self, key: str) -> str:
        """Return the dotted name of a key, for messages."""
        return f"{self.prefix}{key}"

    def raw(self, key: str, default: Any = None) -> Any:
        """Return the plain Python value of a key."""
        node = self._items.get(key)
        if node is None:
            return default
        return _construct(node)

    def child(self, key: str) -> "Located | None":
        """Return a nested mapping, or None when absent or null."""
        node = self._items.get(key)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return None
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError([f"{self.at(key)}: {self.name(key)}: expected a mapping"])
        return Located(node, self.path, f"{self.prefix}{key}.")

    def children(self, key: str) -> list["Located"]:
        """Return a list of nested mappings (e.g. the nodes of an inventory)."""
        node = self._items.get(key)
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError([f"{self.at(key)}: {self.name(key)}: expected a list"])
        out = []
        for i, item in enumerate(node.value):
            if not isinstance(item, yaml.MappingNode):
                raise ConfigError([f"{Where(self.path, item.start_mark.line + 1)}: {self.name(key)}[{i}]: expected a mapping"])
            out.append(Located(item, self.path, f"{self.prefix}{key}[{i}]."))
        return out


def _construct(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def load_yaml_mapping(path: Path) -> Located:
    """Parse a YAML file whose top level is a mapping; raise ConfigError with file:line on failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError([f"{path}:{line}: YAML syntax error: {exc.problem}"]) from exc
    except yaml.YAMLError as exc:  # the reader's errors (a control character, a NUL byte) carry no mark
        raise ConfigError([f"{path}: not YAML: {exc}"]) from exc
    if node is None:
        raise ConfigError([f"{path}:1: empty file"])
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError([f"{path}:{node.start_mark.line + 1}: expected a mapping at top level"])
    return Located(node, str(path))
