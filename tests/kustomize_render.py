"""An offline stand-in for ``kubectl kustomize``, limited to what ``deploy/`` uses.

A kustomization may hold ``resources`` (YAML files, or folders with their own
``kustomization.yaml``) and ``patches`` whose file is a JSON 6902 (RFC 6902) list of ``add``,
``remove``, ``replace`` and ``test`` operations with a ``target`` of ``kind`` and ``name``.
Anything else (other kustomization fields, strategic-merge patches, other target selectors,
other operations) raises ``UnsupportedKustomization`` rather than being ignored, so a rendering
that succeeds is the rendering kustomize gives (``tests/test_deploy.py`` compares the two where
``kubectl`` exists). Stricter than kustomize in two ways: a patch whose target matches no resource
raises, and so does a resource defined twice.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION = "kustomization.yaml"
_FIELDS = {"apiVersion", "kind", "resources", "patches"}
_TARGET_FIELDS = {"kind", "name"}
_OPS = {"add", "remove", "replace", "test"}


class UnsupportedKustomization(ValueError):
    """The kustomization uses something this renderer does not implement."""


class PatchFailed(ValueError):
    """A JSON 6902 operation does not apply (missing path, failed ``test``)."""


def render(directory: Path) -> list[Resource]:
    """The resources of the kustomization in ``directory``, patches applied, in file order."""
    spec = _load_kustomization(directory)
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(_load_documents(path))
    _check_unique(resources)
    for patch in spec.get("patches", []):
        _apply_patch(directory, patch, resources)
    return resources


def resource_id(resource: Resource) -> tuple[str, str, str]:
    """(apiVersion, kind, name): what kustomize keys a resource by."""
    return resource["apiVersion"], resource["kind"], resource["metadata"]["name"]


def apply_json6902(document: Any, operations: list[dict[str, Any]]) -> Any:
    """``document`` with ``operations`` applied in order (the input is not changed)."""
    result = copy.deepcopy(document)
    for operation in operations:
        op = operation.get("op")
        if op not in _OPS:
            raise UnsupportedKustomization(f"JSON 6902 operation {op!r} is not supported")
        tokens = _pointer(operation["path"])
        if not tokens:
            raise UnsupportedKustomization("an operation on the whole document is not supported")
        parent = _walk(result, tokens[:-1], operation["path"])
        key = tokens[-1]
        if op == "test":
            if _get(parent, key, operation["path"]) != operation["value"]:
                raise PatchFailed(f"test failed at {operation['path']}")
        elif op == "remove":
            _get(parent, key, operation["path"])
            del parent[_index(parent, key, operation["path"])]
        elif op == "replace":
            _get(parent, key, operation["path"])
            parent[_index(parent, key, operation["path"])] = copy.deepcopy(operation["value"])
        else:
            _add(parent, key, copy.deepcopy(operation["value"]), operation["path"])
    return result


def _load_kustomization(directory: Path) -> dict[str, Any]:
    path = directory / KUSTOMIZATION
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise UnsupportedKustomization(f"{path}: not a mapping")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise UnsupportedKustomization(f"{path}: unsupported fields {sorted(unknown)}")
    return spec


def _load_documents(path: Path) -> list[Resource]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in documents:
        if not isinstance(doc, dict) or "kind" not in doc:
            raise UnsupportedKustomization(f"{path}: a document that is not a resource")
    return documents


def _check_unique(resources: list[Resource]) -> None:
    seen: set[tuple[str, str, str]] = set()
    for resource in resources:
        key = resource_id(resource)
        if key in seen:
            raise UnsupportedKustomization(f"resource {key} is defined twice")
        seen.add(key)


def _apply_patch(directory: Path, patch: dict[str, Any], resources: list[Resource]) -> None:
    if set(patch) != {"path", "target"}:
        raise UnsupportedKustomization(f"patch {patch}: only path + target is supported")
    target = patch["target"]
    if set(target) - _TARGET_FIELDS:
        raise UnsupportedKustomization(f"patch target {target}: only kind and name are supported")
    operations = yaml.safe_load((directory / patch["path"]).read_text())
    if not isinstance(operations, list):
        raise UnsupportedKustomization(
            f"{patch['path']}: only JSON 6902 patches (a list of operations) are supported"
        )
    matched = False
    for i, resource in enumerate(resources):
        if all(
            (resource["kind"] if field == "kind" else resource["metadata"]["name"]) == value
            for field, value in target.items()
        ):
            resources[i] = apply_json6902(resource, operations)
            matched = True
    if not matched:
        raise PatchFailed(f"patch {patch['path']}: no resource matches {target}")


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchFailed(f"JSON pointer {path!r} does not start with /")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _walk(document: Any, tokens: list[str], path: str) -> Any:
    node = document
    for token in tokens:
        node = _get(node, token, path)
    return node


def _index(container: Any, key: str, path: str) -> Any:
    if isinstance(container, dict):
        return key
    if isinstance(container, list) and key.isdigit():
        return int(key)
    raise PatchFailed(f"{path}: {key!r} does not index a {type(container).__name__}")


def _get(container: Any, key: str, path: str) -> Any:
    index = _index(container, key, path)
    try:
        return container[index]
    except (KeyError, IndexError):
        raise PatchFailed(f"{path}: nothing at {key!r}") from None


def _add(container: Any, key: str, value: Any, path: str) -> None:
    if isinstance(container, dict):
        container[key] = value
    elif isinstance(container, list) and key == "-":
        container.append(value)
    else:
        index = _index(container, key, path)
        if index > len(container):
            raise PatchFailed(f"{path}: index {index} past the end")
        container.insert(index, value)
