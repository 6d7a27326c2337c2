"""``python -m llava_kv.cli``, the same as ``llava-kv`` (and ``python -m llava_kv``)."""
import sys

from . import main

sys.exit(main())
