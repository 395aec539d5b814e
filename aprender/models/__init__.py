"""Model-level work on transformers checkpoints (optional: needs torch and transformers)."""
