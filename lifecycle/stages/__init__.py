"""One module per stage; each exposes `run(cfg) -> Path`."""
