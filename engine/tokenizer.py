"""A model's tokenizer, found the way its weights are: a model folder or a Hub id in the local cache."""

from engine.model_config import model_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model: str):
    """The transformers tokenizer of a model folder or cached Hub snapshot; None for a preset or a folder
    without tokenizer files (such a model takes token ids only)."""
    folder = model_folder(model)
    if folder is None or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # only when there is a tokenizer to load

    return AutoTokenizer.from_pretrained(str(folder))
