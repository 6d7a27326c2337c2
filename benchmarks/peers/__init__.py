"""The peers' side of each scenario. The ``peer_*.py`` scripts run in llama-cpp-python's venv
(benchmarks/harness/llama_cpp_python.py builds it and runs them by path): they import only
llama_cpp, the standard library and their neighbours ``peer_settings`` and ``memory_probe``, never
llava_kv or this package. ``openai_chat`` runs in our process and drives llama-server (and, in the
``serve_*`` scenarios, every server) with the openai client."""
