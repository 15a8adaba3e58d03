"""`--mode export`: a model in another format, one module per format, each with
`export(s: ExportSettings) -> list[str]` (what it wrote, for the user).

    hf.py    a training checkpoint -> a transformers model directory
    gguf.py  a checkpoint or a Hugging Face directory -> one llama.cpp GGUF file

A new format is a module here and one entry in FORMATS (its flags, if it needs new ones, in
commands/export.py). No torch here: the command line lists the formats before anything heavy loads.
"""

from __future__ import annotations

import importlib

from ..settings import ExportSettings

FORMATS = {  # --format NAME (the module's name) -> what it writes
    "hf": "a transformers model directory",
    "gguf": "one llama.cpp GGUF file",
}


def export(s: ExportSettings) -> list[str]:
    """Write the model as `s.format` says, through that format's module."""
    return importlib.import_module(f"{__name__}.{s.format}").export(s)
