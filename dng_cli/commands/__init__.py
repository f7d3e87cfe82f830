"""One module per CLI command; each exposes ``run(cfg, output_dir)`` and a Hydra ``main``."""
