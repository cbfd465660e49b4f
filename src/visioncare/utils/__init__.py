"""Small helpers shared by the entry points: Hydra wiring, run summaries, error reporting."""
