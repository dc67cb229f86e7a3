"""Per-user LoRA adapters over the shared core: refresh (one user or many in one pass), the eval
gate, the versioned adapter registry and the sleep scheduler."""
