"""The one error type of the dataset layer."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset the trainer cannot use: the message names the file, folder or field and says what to do."""
