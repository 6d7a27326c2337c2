"""The one call :meth:`llava_kv.Model.load` makes before llama.cpp or mtmd opens anything: the text
model and, when given, its projector, each checked in full, with an unreadable file reported as a
:class:`~llava_kv.ModelLoadError` like a malformed one.
"""
from __future__ import annotations

import os

from ..errors import ModelLoadError
from .projector_checks import check_projector
from .text_checks import check_text_model

__all__ = ["check_model_files"]


def check_model_files(model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str] | None = None) -> None:
    """Validate the text model and, when given, its projector, before llama.cpp sees either."""
    for path, check in ((model_path, check_text_model), (mmproj_path, check_projector)):
        if path is None or path == "":
            continue
        try:
            check(path)
        except ModelLoadError:
            raise
        except OSError as e:
            raise ModelLoadError(f"{os.fspath(path)}: cannot be read: {e}") from e
