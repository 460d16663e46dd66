#!/usr/bin/env python3
"""Render a kustomization in this folder without kubectl: the subset of kustomize it uses.

    python deploy/k8s/render.py deploy/k8s/overlays/cpu > bastion.yaml

`kubectl kustomize DIR` (kustomize v5) is the reference and gives the same objects; this exists for
machines without kubectl, and tests/test_k8s_manifests.py checks the two agree where both run.

Implemented, in kustomize's order within one kustomization (after its resources are loaded, each
sub-kustomization fully rendered first):

- ``resources``: YAML files (one or more documents) and folders holding a kustomization.yaml;
- ``patches``: ``path`` or inline ``patch``, optional ``target`` (group, version, kind, name,
  namespace; name is an anchored regular expression as in kustomize). A patch that is a mapping
  is a strategic-merge patch (maps merge key by key, ``null`` deletes, the Kubernetes merge keys
  below merge lists of objects, every other list is replaced, ``$patch: delete|replace``); a patch
  that is a list is a JSON 6902 patch (add, remove, replace, move, copy, test) and needs a target;
- ``namespace``: set on every namespaced object;
- ``labels``: ``pairs`` added to metadata.labels and, with ``includeTemplates``, to pod templates
  (``includeSelectors: true`` is refused: selectors are written out in the manifests);
- ``images``: ``name`` with ``newName``, ``newTag`` and/or ``digest``, on every container and
  init container image whose name matches.

Anything else in a kustomization (generators, replacements, commonLabels, ...) is an error, never
silently ignored.
"""
from __future__ import annotations

import copy
import pathlib
import re
import sys
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
                  "RuntimeClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration", "APIService", "Node"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Strategic-merge keys of the Kubernetes API for lists of objects (patchMergeKey); lists not
# named here are replaced whole, as the API's "atomic" lists are.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "volumes": "name", "env": "name", "imagePullSecrets": "name", "volumeMounts": "mountPath",
    "volumeDevices": "devicePath", "hostAliases": "ip", "topologySpreadConstraints": "topologyKey",
}


class RenderError(Exception):
    pass


def _load_documents(path: pathlib.Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise RenderError(f"{path}: every document must be an object with apiVersion and kind")
    return docs


def _kustomization_file(folder: pathlib.Path) -> pathlib.Path:
    for name in KUSTOMIZATION_FILES:
        if (folder / name).is_file():
            return folder / name
    raise RenderError(f"{folder}: no kustomization.yaml")


# --- strategic merge -----------------------------------------------------------------------------

def _merge_key(field: str, parent_kind: str | None, items: list) -> str | None:
    if field == "ports":
        # Container ports merge on containerPort, Service ports on port.
        return "port" if parent_kind == "Service" else "containerPort"
    return MERGE_KEYS.get(field)


def _merge_list(original: list, patch: list, key: str, where: str, kind: str | None) -> list:
    """Merge by key. Order as kustomize (kyaml) gives it: the patch's items first, in the patch's
    order (merged into their originals), then the original items the patch did not name."""
    by_key = {item.get(key): item for item in original if isinstance(item, dict)}
    named = set()
    head = []
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise RenderError(f"{where}: list items must be objects with {key!r}")
        named.add(item[key])
        directive = item.get("$patch")
        existing = by_key.get(item[key])
        if directive == "delete":
            continue
        if directive == "replace":
            head.append(_strip_directives({k: v for k, v in item.items() if k != "$patch"}))
        elif directive is not None:
            raise RenderError(f"{where}: unsupported $patch: {directive}")
        elif existing is None:
            head.append(_strip_directives(copy.deepcopy(item)))
        else:
            head.append(_merge(existing, item, f"{where}[{key}={item[key]}]", kind))
    tail = [copy.deepcopy(item) for item in original
            if not (isinstance(item, dict) and item.get(key) in named)]
    return head + tail


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items()
                if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _merge(original: Any, patch: Any, where: str, kind: str | None) -> Any:
    if not isinstance(patch, dict) or not isinstance(original, dict):
        return _strip_directives(copy.deepcopy(patch))
    directive = patch.get("$patch")
    if directive == "replace":
        return _strip_directives({k: v for k, v in patch.items() if k != "$patch"})
    if directive is not None:
        raise RenderError(f"{where}: unsupported $patch: {directive} on an object")
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise RenderError(f"{where}: unsupported directive {key}")
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            merge_key = _merge_key(key, kind, value)
            if merge_key is not None and all(isinstance(v, dict) for v in value):
                result[key] = _merge_list(result[key], value, merge_key, f"{where}.{key}", kind)
            else:
                result[key] = _strip_directives(copy.deepcopy(value))
        elif key in result:
            result[key] = _merge(result[key], value, f"{where}.{key}", kind)
        else:
            result[key] = _strip_directives(copy.deepcopy(value))
    return result


def strategic_merge(resource: dict, patch: dict) -> dict:
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    name = resource["metadata"]["name"]
    merged = _merge(resource, body, f"{resource['kind']}/{name}", resource["kind"])
    merged["metadata"]["name"] = name  # a patch's metadata.name selects, never renames
    return merged


# --- JSON 6902 -----------------------------------------------------------------------------------

def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError) as err:
            raise RenderError(f"JSON patch path {path!r} not found") from err
    return node


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent = _parent(doc, parts, path)
    try:
        return parent[int(parts[-1])] if isinstance(parent, list) else parent[parts[-1]]
    except (KeyError, IndexError, ValueError) as err:
        raise RenderError(f"JSON patch path {path!r} not found") from err


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    parent = _parent(doc, parts, path)
    try:
        return parent.pop(int(parts[-1])) if isinstance(parent, list) else parent.pop(parts[-1])
    except (KeyError, IndexError, ValueError) as err:
        raise RenderError(f"JSON patch path {path!r} not found") from err


def _add(doc: Any, path: str, value: Any, replace: bool = False) -> None:
    parts = _pointer(path)
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(value)
            return
        index = int(last)
        if replace:
            if not 0 <= index < len(parent):
                raise RenderError(f"JSON patch path {path!r} not found")
            parent[index] = value
        else:
            if not 0 <= index <= len(parent):
                raise RenderError(f"JSON patch path {path!r} out of range")
            parent.insert(index, value)
    elif isinstance(parent, dict):
        if replace and last not in parent:
            raise RenderError(f"JSON patch path {path!r} not found")
        parent[last] = value
    else:
        raise RenderError(f"JSON patch path {path!r}: parent is not a container")


def json6902(resource: dict, operations: list) -> dict:
    doc = copy.deepcopy(resource)
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "replace":
            _add(doc, path, copy.deepcopy(op["value"]), replace=True)
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "move":
            _add(doc, path, _remove(doc, op["from"]))
        elif kind == "copy":
            _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise RenderError(f"JSON patch test failed at {path!r}: expected {op['value']!r}")
        else:
            raise RenderError(f"unsupported JSON patch op {kind!r}")
    return doc


# --- transformers ---------------------------------------------------------------------------------

def _matches(resource: dict, target: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise RenderError(f"patch target: unsupported selector(s) {sorted(unknown)}")
    group, _, version = resource["apiVersion"].rpartition("/")
    meta = resource.get("metadata", {})
    checks = {"group": group, "version": version, "kind": resource["kind"],
              "name": meta.get("name", ""), "namespace": meta.get("namespace", "")}
    return all(re.fullmatch(str(target[k]), checks[k]) for k in target)


def _apply_patches(resources: list[dict], patches: list, folder: pathlib.Path) -> list[dict]:
    for entry in patches:
        if "path" in entry:
            text = (folder / entry["path"]).read_text(encoding="utf-8")
        elif "patch" in entry:
            text = entry["patch"]
        else:
            raise RenderError(f"{folder}: a patch needs path or patch")
        unknown = set(entry) - {"path", "patch", "target"}
        if unknown:
            raise RenderError(f"{folder}: unsupported patch field(s) {sorted(unknown)}")
        body = yaml.safe_load(text)
        target = entry.get("target")
        if isinstance(body, list):
            if target is None:
                raise RenderError(f"{folder}: a JSON 6902 patch needs a target")
            apply = lambda r, b=body: json6902(r, b)  # noqa: E731
        elif isinstance(body, dict):
            if target is None:
                target = {"kind": body["kind"], "name": re.escape(body["metadata"]["name"])}
            apply = lambda r, b=body: strategic_merge(r, b)  # noqa: E731
        else:
            raise RenderError(f"{folder}: a patch must be a mapping or a list")
        hits = 0
        for i, resource in enumerate(resources):
            if _matches(resource, target):
                resources[i] = apply(resource)
                hits += 1
        if hits == 0:
            raise RenderError(f"{folder}: patch {entry.get('path', '(inline)')} matched nothing")
    return resources


def _set_namespace(resources: list[dict], namespace: str) -> None:
    for resource in resources:
        if resource["kind"] not in CLUSTER_SCOPED:
            resource.setdefault("metadata", {})["namespace"] = namespace


def _add_labels(resources: list[dict], entries: list) -> None:
    for entry in entries:
        unknown = set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
        if unknown:
            raise RenderError(f"labels: unsupported field(s) {sorted(unknown)}")
        if entry.get("includeSelectors"):
            raise RenderError("labels: includeSelectors is not implemented; write selectors out")
        pairs = {str(k): str(v) for k, v in entry["pairs"].items()}
        for resource in resources:
            meta = resource.setdefault("metadata", {})
            meta["labels"] = {**(meta.get("labels") or {}), **pairs}
            if entry.get("includeTemplates") and resource["kind"] in POD_TEMPLATE_KINDS:
                template = resource.setdefault("spec", {}).setdefault("template", {})
                tmeta = template.setdefault("metadata", {})
                tmeta["labels"] = {**(tmeta.get("labels") or {}), **pairs}


def _split_image(image: str) -> tuple[str, str, str]:
    name, digest = (image.split("@", 1) + [""])[:2]
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest


def _set_images(resources: list[dict], images: list) -> None:
    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and "image" in container:
                            container["image"] = rewrite(container["image"])
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    def rewrite(image: str) -> str:
        name, tag, digest = _split_image(image)
        for entry in images:
            if entry["name"] != name:
                continue
            unknown = set(entry) - {"name", "newName", "newTag", "digest"}
            if unknown:
                raise RenderError(f"images: unsupported field(s) {sorted(unknown)}")
            name = entry.get("newName", name)
            if "digest" in entry:
                return f"{name}@{entry['digest']}"
            if "newTag" in entry:
                tag, digest = str(entry["newTag"]), ""
            break
        return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")

    for resource in resources:
        visit(resource)


# --- driver ---------------------------------------------------------------------------------------

def build(folder: str | pathlib.Path) -> list[dict]:
    folder = pathlib.Path(folder)
    kfile = _kustomization_file(folder)
    kustomization = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    unknown = set(kustomization) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{kfile}: render.py does not implement {sorted(unknown)}; "
                          "use kubectl kustomize")
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources.extend(build(path))
        elif path.is_file():
            resources.extend(_load_documents(path))
        else:
            raise RenderError(f"{kfile}: resource {entry!r} not found")
    seen = set()
    for r in resources:
        ident = (r["apiVersion"].rpartition("/")[0], r["kind"],
                 r["metadata"].get("namespace", ""), r["metadata"]["name"])
        if ident in seen:
            raise RenderError(f"{kfile}: duplicate resource {ident}")
        seen.add(ident)
    resources = _apply_patches(resources, kustomization.get("patches", []), folder)
    if "namespace" in kustomization:
        _set_namespace(resources, kustomization["namespace"])
    _add_labels(resources, kustomization.get("labels", []))
    _set_images(resources, kustomization.get("images", []))
    return resources


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        docs = build(argv[0])
    except (RenderError, OSError, yaml.YAMLError) as err:
        print(f"render.py: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
