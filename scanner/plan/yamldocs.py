"""Reading YAML for the inventories: text files, an Ansible-aware safe loader (``!vault``,
``!unsafe``), documents with line-numbered errors, Kubernetes objects and ConfigMaps.

Pure but for reading the files named by the caller.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scanner.errors import InventoryError
from scanner.plan.templates import VAULTED, Vaulted

try:  # the C loader is ~10x faster on large inventories; same safe semantics
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader


def read_text(path: str | Path, what: str = "file") -> str:
    """Read a text file; any OS or decoding problem becomes one InventoryError line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InventoryError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InventoryError(f"{path}: not UTF-8 text (byte {e.start})") from None


class _AnsibleLoader(_Loader):  # type: ignore[misc, valid-type]
    """The safe loader plus Ansible's tags: ``!vault`` (kept as VAULTED), ``!unsafe`` (a plain
    string: it only stops Jinja from rendering it)."""


def _vault(loader: Any, node: Any) -> Vaulted:
    return VAULTED


def _unsafe(loader: Any, node: Any) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)


_AnsibleLoader.add_constructor("!vault", _vault)
_AnsibleLoader.add_constructor("!unsafe", _unsafe)
VAULT_HEADER = "$ANSIBLE_VAULT;"


def load_yaml_documents(text: str, where: str) -> list[Any]:
    """All YAML documents of ``text`` (None for empty ones), errors with the line number."""
    if text.lstrip().startswith(VAULT_HEADER):
        raise InventoryError(
            f"{where}: vault-encrypted: run `ansible-inventory -i INVENTORY --list"
            " --vault-password-file FILE > inv.json` and give portmesh inv.json"
        )
    try:
        return list(yaml.load_all(text, Loader=_AnsibleLoader))
    except yaml.YAMLError as e:
        raise yaml_error(where, e) from None
    except (ValueError, TypeError, RecursionError) as e:  # e.g. bad timestamps, deep nesting
        raise InventoryError(f"{where}: unreadable YAML: {e}") from None


def yaml_error(where: str, e: yaml.YAMLError) -> InventoryError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is not None:
        return InventoryError(f"{where}: YAML error at line {mark.line + 1}: {problem}")
    return InventoryError(f"{where}: YAML error: {problem}")


def is_kubernetes_object(doc: Any) -> bool:
    return isinstance(doc, dict) and ("kind" in doc or "apiVersion" in doc)


def kubernetes_objects(docs: Sequence[Any], where: str) -> Iterator[dict[str, Any]]:
    """The objects of the documents, with ``kind: List`` items flattened (one level, as kubectl)."""
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise InventoryError(
                f"{where}: a YAML document is not a mapping ({type(doc).__name__})"
            )
        if doc.get("kind") == "List":
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise InventoryError(f"{where}: kind List: items is not a list")
            for item in items:
                if not isinstance(item, dict):
                    raise InventoryError(f"{where}: kind List: an item is not a mapping")
                yield item
        else:
            yield doc


@dataclass(frozen=True)
class ConfigMap:
    name: str
    data: dict[str, str]
    where: str  # "file (ConfigMap name)", for messages and Setting sources


def object_name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return str(name) if isinstance(name, (str, int)) and str(name) else "<unnamed>"


def configmap(obj: Mapping[str, Any], path: str) -> ConfigMap:
    name = object_name(obj)
    where = f"{path} (ConfigMap {name})"
    data = obj.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InventoryError(f"{where}: data is not a mapping")
    out: dict[str, str] = {}
    for k, v in data.items():
        if not isinstance(v, str):
            raise InventoryError(f"{where}: data[{k!r}] is not a string ({type(v).__name__})")
        out[str(k)] = v
    return ConfigMap(name, out, where)


def configmaps(docs: Sequence[Any], path: str) -> list[ConfigMap]:
    return [
        configmap(o, path) for o in kubernetes_objects(docs, path) if o.get("kind") == "ConfigMap"
    ]
