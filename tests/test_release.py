"""Memory comes back: load/close cycles and teardown at exit (on a device: tests/test_gpu.py)."""
import gc
import subprocess
import sys
import textwrap
from pathlib import Path


import llava_kv as lk
from llava_kv.testing import random_image

from conftest import rss_bytes

ROOT = Path(__file__).resolve().parent.parent


def _cycle(pair, image, use_with: bool) -> None:
    if use_with:
        with lk.Model.load(pair.model_path, pair.mmproj_path) as m, m.session(n_ctx=512) as s:
            s.append_text("USER: ")
            s.append_image(image)
            s.append_text(" describe\nASSISTANT:")
            s.logits()
    else:
        # no close(): dropping the last references must free just as well
        m = lk.Model.load(pair.model_path, pair.mmproj_path)
        s = m.session(n_ctx=512)
        s.append_text("USER: ")
        s.append_image(image)
        s.append_text(" describe\nASSISTANT:")
        s.logits()
        del m, s
        gc.collect()


def test_fifty_load_close_cycles_do_not_grow_rss(llava_pair):
    image = random_image(0)
    rss = []
    for i in range(50):
        _cycle(llava_pair, image, use_with=i % 2 == 0)
        rss.append(rss_bytes())
    drift = rss[49] - rss[4]
    print(f"RSS cycle 5: {rss[4] / 2**20:.2f} MiB, cycle 50: {rss[49] / 2**20:.2f} MiB, drift {drift / 2**20:+.3f} MiB")
    assert drift < 8 * 2**20
    assert lk._core.native_objects() == {"models": 0, "sessions": 0, "batch_runners": 0}


def test_exit_without_closing_is_clean(llava_pair):
    script = textwrap.dedent(f"""
        import llava_kv as lk
        from llava_kv.testing import random_image
        m = lk.Model.load({str(llava_pair.model_path)!r}, {str(llava_pair.mmproj_path)!r})
        s = m.session(n_ctx=256)
        s.append_text("USER: "); s.append_image(random_image(0)); s.append_text(" hi")
        keep = (m, s)  # alive at interpreter exit, never closed
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stderr == ""


def test_closed_objects_need_no_garbage_collector(llava_pair):
    """Reference counting alone frees the Python objects (and their native shells): no cycles."""
    gc.collect()
    before = lk._core.native_objects()
    gc.disable()
    try:
        for i in range(5):
            with lk.Model.load(llava_pair.model_path, llava_pair.mmproj_path) as m, m.session(n_ctx=256) as s:
                s.append_text("USER: ")
                s.append_image(random_image(i))
                s.append_text(" hi")
                assert len(s.images) == 1
                s.chat([{"role": "user", "content": "hello"}], max_tokens=2)
                lk.batch.run(m, [random_image(i)], "Describe.", max_tokens=2, progress=False)
            del m, s
        assert lk._core.native_objects() == before
    finally:
        gc.enable()
