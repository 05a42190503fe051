"""The bridge's HTTP routes, one module per group; ``sie_bridge.app`` mounts them."""
