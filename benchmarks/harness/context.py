"""What every scenario's ``run_*(ctx)`` gets from the suite: the model pair, the options, where to
write, and the two peers (or why there are none)."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llava_kv.testing import TestModel

from benchmarks.harness import llama_server
from benchmarks.harness.llama_cpp_python import PeerError, peer_build_info, peer_python, threads

if TYPE_CHECKING:
    from benchmarks.harness.suite import SuitePreset


class Context:
    """What every scenario needs: the model pair, where to write, the peers (or why there are none)."""

    def __init__(self, args: argparse.Namespace, preset: SuitePreset, pair: TestModel, gpu: bool) -> None:
        self.args = args
        self.preset = preset
        self.pair = pair
        self.gpu = gpu
        self.repeat = args.repeat or preset.repeat
        self.work = Path(tempfile.mkdtemp(prefix="llava-kv-bench-"))
        self.n_gpu_layers = -1 if gpu else 0
        # flash attention on, stated rather than left to "auto", as both peers are started with it
        self.load_kwargs: dict[str, Any] = {"n_gpu_layers": self.n_gpu_layers, "n_threads": threads(),
                                            "flash_attn": "on"}
        self.peer_py: Path | None = None
        self.peer_reason: str | None = None
        self.peer_info: dict[str, Any] | None = None
        if args.no_peer:
            self.peer_reason = "skipped: --no-peer"
        else:
            try:
                self.peer_py = peer_python(gpu=gpu, build=not args.no_peer_build)
                self.peer_info = peer_build_info(self.peer_py)
            except (PeerError, OSError, SystemExit) as e:  # SystemExit: the sdist fetch failed
                lines = str(e).strip().splitlines()
                self.peer_reason = f"peer unavailable: {lines[-1] if lines else repr(e)}"
        self.server_bin: Path | None = None
        self.server_reason: str | None = None
        self.server_info: dict[str, Any] | None = None
        if args.no_server:
            self.server_reason = "skipped: --no-server"
        elif gpu:
            self.server_reason = "skipped: the llama-server peer is built for CPU only"
        else:
            try:
                import openai  # noqa: F401  # the client the server is driven with (the bench extra)

                self.server_bin = llama_server.server_binary(build=not args.no_peer_build)
                self.server_info = llama_server.build_info()
            except ImportError:
                self.server_reason = "llama-server unavailable: the openai client is not installed (pip install openai)"
            except (llama_server.ServerError, OSError) as e:
                self.server_reason = f"llama-server unavailable: {e}"

    @property
    def peer(self) -> bool:
        return self.peer_py is not None

    def server(self, *, parallel: int, n_ctx: int, **kwargs: Any) -> llama_server.LlamaServer:
        """A llama-server on the same model pair with our settings (start it with ``with``)."""
        assert self.server_bin is not None
        return llama_server.LlamaServer(self.server_bin, self.pair.model_path, self.pair.mmproj_path,
                                        threads=threads(), parallel=parallel, n_ctx=n_ctx,
                                        log=self.work / f"llama-server-{time.monotonic_ns()}.log", **kwargs)

    @property
    def server_factory(self) -> Callable[..., llama_server.LlamaServer] | None:
        return self.server if self.server_bin is not None else None

    def peer_reasons(self, result: dict[str, Any]) -> dict[str, str]:
        reasons = {}
        if self.peer_reason:
            reasons["peer"] = self.peer_reason
        elif result.get("peer_error"):
            reasons["peer"] = "peer run failed: " + result["peer_error"].strip().splitlines()[-1][:300]
        if self.server_reason:
            reasons["server"] = self.server_reason
        elif result.get("server_error"):
            reasons["server"] = "llama-server run failed: " + result["server_error"].strip().splitlines()[-1][:300]
        return reasons
