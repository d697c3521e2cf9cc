"""Acting on adapters: prune-by-importance sweeps on a live model, resizing adapter files."""
