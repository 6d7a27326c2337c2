"""What runs the scenarios and is shared by them: the suite driver (``suite``, behind ``python -m
benchmarks``), what every scenario gets (``context``), the shape of a results.json entry and the
timing helpers (``scenario``), the settings each side records (``settings``), the machine
(``machine``), the plots, table and README block (``report``), and the two peers' builders and
processes: llama-cpp-python's venv (``llama_cpp_python``) and llama-server (``llama_server``)."""
