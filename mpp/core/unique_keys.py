"""JSON and YAML text to plain data, refusing a mapping that sets a key twice.

json.loads and yaml.safe_load both keep a repeated key's last value without a word, so a config
file edited by appending `lr: 0.01` below an older `lr:` runs with whichever came last, and one
whose earlier line was meant reads as if it were not there. Here a repeated key raises RepeatedKey,
naming it (with its section in a run's config.json, and its lines in YAML).
"""
from __future__ import annotations

import collections
import json


class RepeatedKey(ValueError):
    """str(): which key is repeated and where, e.g. "key 'train.lr'" or "key 'lr' (lines 2 and 5)"."""


def load_json(text: str):
    """json.loads(text), or RepeatedKey for the first object (outermost first) that repeats a key."""
    repeats: list = []  # (the object, its first repeated key), innermost first: as the parser builds them

    def pairs_hook(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            counts = collections.Counter(key for key, _ in pairs)
            repeats.append((obj, next(key for key, _ in pairs if counts[key] > 1)))
        return obj

    data = json.loads(text, object_pairs_hook=pairs_hook)
    if repeats:
        obj, key = repeats[-1]  # the outermost: the parser finishes an object after those inside it
        raise RepeatedKey(f"key '{_where(data, obj)}{key}'")
    return data


def _where(data, obj) -> str | None:
    """"train." when `obj` is data["train"]: the section a repeated key is in ("" at the top)."""
    if data is obj:
        return ""
    children = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for name, child in children:
        if isinstance(child, (dict, list)) and (inner := _where(child, obj)) is not None:
            return f"{name}.{inner}"
    return None


def load_yaml(text: str):
    """yaml.safe_load(text) (plain data only), or RepeatedKey for the first mapping that repeats a key:
    YAML requires a mapping's keys to be unique, and PyYAML does not check it."""
    import yaml  # PyYAML: imported where used, as mpp.core.config_file imports it

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines: dict = {}
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                # Only keys written in this mapping: those a merge (<<: *base) brings in may be overridden.
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                    if key in lines:
                        raise RepeatedKey(f"key '{key}' (lines {lines[key]} and {line})")
                    lines[key] = line
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeys)  # a SafeLoader subclass: what safe_load builds, no more
