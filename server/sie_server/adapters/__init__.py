"""Model adapters: one module per model family, all behind ``ModelAdapter``."""
