"""TileLang kernel templates, one per kernel family; each exposes a config dataclass and build(cfg)."""
