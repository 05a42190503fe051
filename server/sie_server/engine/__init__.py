"""The engine: model registry, per-model batching executors, output conversion."""
