"""Reading a YAML file a person wrote, safely: a mapping at the top, no key given twice, no
anchors that expand without bound. Imports nothing of cascade (configs and import mappings use it)."""

from __future__ import annotations

from pathlib import Path

import yaml


class YamlError(ValueError):
    """An unreadable or refused YAML file; the message names it (and the line, where known)."""


MAX_YAML_VALUES = 100_000  # values a YAML file may hold once its aliases are expanded


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (a merged ``<<`` key may be
    overridden, as YAML intends)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key '{key}' given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """Values ``node`` holds with every alias expanded, computed without expanding (memo per
    node): a few lines of anchors can stand for billions of values."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_nodes:
        raise yaml.YAMLError("an anchor refers to itself")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo, open_nodes) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, open_nodes) + _expanded_size(v, memo, open_nodes) for k, v in node.value)
    else:
        size = 1
    open_nodes.discard(id(node))
    memo[id(node)] = min(size, MAX_YAML_VALUES + 1)
    return memo[id(node)]


def read_yaml(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping; duplicate keys, anchors that expand past
    ``MAX_YAML_VALUES`` values and anything else unreadable raise YamlError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise YamlError(f"{path}: cannot read: {e}") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise YamlError(f"{path}: its anchors and aliases expand to more than {MAX_YAML_VALUES:,} values; refused")
        body = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        where = f", line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise YamlError(f"{path}{where}: not valid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{path}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(body, dict):
        raise YamlError(f"{path}: the top level must be a mapping (key: value lines), got {type(body).__name__}")
    return body
