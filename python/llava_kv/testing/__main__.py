"""``python -m llava_kv.testing``: the same command as ``llava-kv make-test-model``."""
from .cli import main

raise SystemExit(main())
