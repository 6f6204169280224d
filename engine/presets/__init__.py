"""Bundled config.json files of supported models, used with load_format="dummy"."""
