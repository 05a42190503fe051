"""The model catalog: one YAML file per model, parsed into frozen ``ModelSpec`` objects."""

from sie_server.catalog.spec import CatalogError, ModelSpec, OutputSpec, ProfileSpec
from sie_server.catalog.store import BUILTIN_CATALOG_DIR, Catalog, load_catalog

__all__ = [
    "BUILTIN_CATALOG_DIR",
    "Catalog",
    "CatalogError",
    "ModelSpec",
    "OutputSpec",
    "ProfileSpec",
    "load_catalog",
]
