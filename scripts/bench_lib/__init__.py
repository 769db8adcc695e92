"""Helper modules for scripts/bench (the side-by-side proxy benchmark)."""
