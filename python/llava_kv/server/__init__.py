"""``llava-kv serve``: an OpenAI-compatible HTTP server where editing a conversation costs only
what changed (install with ``pip install 'llava-kv[server]'``).

- :mod:`.engine`: the model, the pool of slots, slot matching, eviction and restore, the batched
  generation loop (one thread does all native work).
- :mod:`.store`: conversations out of their slots (host memory, ``--state-dir``) and the prefix
  signatures requests are matched against.
- :mod:`.app`: the Starlette app (chat completions and completions with SSE streaming, tokenize,
  detokenize, models, health, metrics, the OpenAPI document).
- :mod:`.protocol`: the request and response bodies as typed models (pydantic), and the OpenAPI
  document built from them.
- :mod:`.media`: what clients may make the server read (inline media; local files only inside an
  allowed folder; never a remote URL) and the size limits.
- :mod:`.metrics`: the Prometheus text page.
"""
from __future__ import annotations

from .engine import Engine, ServerConfig
from .media import MediaPolicy, RequestError

__all__ = ["Engine", "ServerConfig", "MediaPolicy", "RequestError", "create_app"]


def create_app(engine: Engine, **kwargs: object):  # type: ignore[no-untyped-def]
    """The ASGI app over ``engine`` (see :func:`llava_kv.server.app.create_app`)."""
    from .app import create_app as _create_app

    return _create_app(engine, **kwargs)  # type: ignore[arg-type]
