"""Reading catalog folders into an immutable name -> ModelSpec mapping."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import yaml

from sie_server.catalog.spec import CatalogError, ModelSpec, parse_spec

BUILTIN_CATALOG_DIR = Path(__file__).parent / "models"


class Catalog(Mapping[str, ModelSpec]):
    """Model specs by name, in file order."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                first = self._specs[spec.name].source_file
                raise CatalogError(f"{spec.source_file}: model {spec.name!r} already in {first}")
            self._specs[spec.name] = spec

    def __getitem__(self, name: str) -> ModelSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def load_catalog(folders: Iterable[Path]) -> Catalog:
    """Parse every ``*.yaml``/``*.yml`` in the folders; later folders may not redefine names."""
    specs: list[ModelSpec] = []
    for folder in folders:
        if not folder.is_dir():
            raise CatalogError(f"models dir {folder} does not exist")
        files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
        for file in files:
            try:
                raw = yaml.safe_load(file.read_text())
            except yaml.YAMLError as exc:
                raise CatalogError(f"{file}: not valid YAML: {exc}") from exc
            specs.append(parse_spec(raw, source_file=file))
    return Catalog(specs)
