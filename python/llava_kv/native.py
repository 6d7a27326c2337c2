"""What every facade over a native object shares: close(), closed, and the context-manager protocol."""
from __future__ import annotations

from types import TracebackType
from typing import Generic, TypeVar, Union

from . import _core

__all__ = ["NativeObject"]

# The compiled objects a facade owns (each has close() and closed), and the facades over them.
CoreT = TypeVar("CoreT", bound=Union[_core.Model, _core.Session])
T = TypeVar("T", bound="NativeObject[_core.Model] | NativeObject[_core.Session]")


class NativeObject(Generic[CoreT]):
    """A Python object owning native memory through ``self._core``; ``close()`` frees it (idempotent)."""

    _core: CoreT

    def close(self) -> None:
        """Free the native memory now. Idempotent; later use raises :class:`llava_kv.ClosedError`."""
        self._core.close()

    @property
    def closed(self) -> bool:
        return bool(self._core.closed)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
