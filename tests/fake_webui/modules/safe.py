"""modules.safe: the webui (v1.10.1) puts its own `load` in place of `torch.load`. It checks the zip's
entry names against `allowed_zip_names_re`, which lacks the `.format_version` entry torch 2.x writes,
and on a refusal prints the error and returns None."""

import re
import zipfile

import torch

allowed_zip_names_re = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
unsafe_torch_load = torch.load


def load(filename, *args, **kwargs):
    with zipfile.ZipFile(filename) as z:
        bad = [name for name in z.namelist() if not allowed_zip_names_re.match(name)]
    if bad:
        print(f"Error verifying pickled file from {filename}: bad file inside {filename}: {bad[0]}")
        return None
    return unsafe_torch_load(filename, *args, **kwargs)
