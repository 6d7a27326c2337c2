"""Plots (PNG, matplotlib) and the README results table, both made from results.json alone, so that
``--readme`` can rebuild the table from every committed run."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from benchmarks.machine import label

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TITLES = {
    "multi_turn": "multi-turn chat, one image (turns 2..N)",
    "replace_last_image": "replace the last image (~2k tokens)",
    "replace_middle_image": "replace the middle image (~2k tokens)",
    "readd_image": "re-add a seen image",
    "batch": "batch captioning",
    "token_overhead": "per-token generation cost",
    "load_close": "load/close cycles, memory drift",
    "build_time": "wheel build from scratch",
}
OURS, LIMIT, PEER, OTHER = "#1f77b4", "#2ca02c", "#d62728", "#7f7f7f"


# --- plots -----------------------------------------------------------------------------------


def _bars(ax: Any, labels: list[str], values: list[Optional[float]], colors: list[str], unit: str) -> None:
    shown = [(l, v, c) for l, v, c in zip(labels, values, colors) if v is not None]
    if not shown:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    names, vals, cols = zip(*shown)
    bars = ax.bar(names, vals, color=cols)
    for bar, v in zip(bars, vals):
        ax.annotate(_num(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(unit)
    ax.tick_params(axis="x", labelsize=8)


def plot_all(results: dict[str, Any], out: Path) -> list[str]:
    """Write the plots into ``out``; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    sc = results["scenarios"]
    subtitle = f"{results['preset']} preset ({results['model']['preset']}), {label(results['machine'])}"
    written = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.suptitle(f"{title}\n{subtitle}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    mt = sc["multi_turn"]
    if mt["ours"] is not None:
        d = mt["details"]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        turns = list(range(1, len(d["ours_s"]) + 1))
        ax.plot(turns, d["ours_s"], "o-", color=OURS, label="llava-kv")
        ax.plot(turns[1:], d["limit_s"][1:], "s--", color=LIMIT, label="limit: new turn only")
        if d.get("peer_s"):
            ax.plot(turns, d["peer_s"], "^-", color=PEER, label="llama-cpp-python")
        ax.set_xlabel("turn")
        ax.set_ylabel("seconds")
        ax.set_xticks(turns)
        ax.legend(fontsize=8)
        save(fig, "multi_turn.png", "Multi-turn chat with one image: seconds per turn")

    edits = [k for k in ("replace_last_image", "replace_middle_image") if sc[k]["ours"] is not None]
    if edits:
        fig, axes = plt.subplots(1, len(edits), figsize=(max(6.4, 4.2 * len(edits)), 3.6), squeeze=False)
        for ax, k in zip(axes[0], edits):
            e = sc[k]
            _bars(ax, ["llava-kv", "limit:\nsuffix", "fresh\nprefill", "llama-cpp-\npython"],
                  [e["ours"], e["limit"], e["details"]["fresh_prefill_ms"], e["peer"]], [OURS, LIMIT, OTHER, PEER],
                  "ms")
            ax.set_title(TITLES[k], fontsize=9)
        save(fig, "edits.png", "Image edits in a ~2k-token conversation")

    b = sc["batch"]
    if b["ours"] is not None:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        _bars(ax, ["llava-kv\nbatch.run", "limit\n(estimate)", "llama-cpp-python\nloop"],
              [b["ours"], b["limit"], b["peer"]], [OURS, LIMIT, PEER], "images/s (higher is better)")
        save(fig, "batch.png", "Batch captioning throughput")

    t = sc["token_overhead"]
    if t["ours"] is not None:
        ms = t["details"]["ms_per_token"]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        source = t["details"].get("limit_source")
        _bars(ax, ["C++ loop\n(batch)", "native step\nfrom Python", "generate()", "generate\n(stream)",
                   "llama-cpp-\npython"],
              [ms.get("cpp_loop"), ms.get("native_step"), ms.get("text"), ms.get("stream"), t["peer"]],
              [LIMIT if source == "cpp_loop" else OTHER, LIMIT if source == "native_step" else OTHER, OTHER, OURS,
               PEER], "ms per token (green: the limit)")
        save(fig, "token_overhead.png", "Per-token generation cost")

    lc = sc["load_close"]
    if lc["ours"] is not None:
        series = [("ours", "llava-kv", OURS), ("peer", "llama-cpp-python", PEER)]
        gpu = any((lc["details"].get(w) or {}).get("gpu_mib") for w, _, _ in series)
        fig, axes = plt.subplots(1, 2 if gpu else 1, figsize=(10 if gpu else 6.4, 3.6), squeeze=False)
        for ax, key, what in zip(axes[0], ("rss_mib", "gpu_mib"), ("RSS", "GPU memory")):
            for who, name, color in series:
                run = lc["details"].get(who) or {}
                values = run.get(key)
                if values:
                    drift = _num(run.get(key.replace("_mib", "_drift_mib")))
                    ax.plot(range(1, len(values) + 1), [v - values[0] for v in values], color=color,
                            label=f"{name} (drift {drift} MiB)")
            ax.axhline(0, color=LIMIT, linestyle="--", linewidth=1, label="limit: 0")
            ax.set_xlabel("cycle")
            ax.set_ylabel(f"{what} after close, MiB vs cycle 1")
            ax.legend(fontsize=8)
        save(fig, "load_close.png", "Memory after each load/close cycle")

    bt = sc["build_time"]
    if bt["ours"] is not None:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        _bars(ax, ["llava-kv", "limit:\nllama.cpp libs", "llama-cpp-\npython"], [bt["ours"], bt["limit"], bt["peer"]],
              [OURS, LIMIT, PEER], "seconds")
        save(fig, "build_time.png", "Wheel build from a clean build folder")
    return written


# --- table -----------------------------------------------------------------------------------


def _num(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    if float(x).is_integer() and abs(x) < 1000:
        return str(int(x))
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def table(results: dict[str, Any]) -> str:
    """A Markdown table of the headline figures of one run."""
    rows = ["| scenario | unit | llava-kv | limit | llama-cpp-python | llava-kv vs limit | "
            "llama-cpp-python vs llava-kv |", "|---|---|---|---|---|---|---|"]
    for key, e in results["scenarios"].items():
        r = e["ratios"]
        if e["ours"] is None:
            rows.append(f"| {TITLES.get(key, key)} | {e['unit']} | {e['reasons'].get('ours', 'n/a')} | | | | |")
            continue
        vs_limit = _ratio(r.get("ours_vs_limit")) if r.get("ours_vs_limit") is not None else (
            f"+{_num(r['ours_minus_limit'])}" if r.get("ours_minus_limit") is not None else "n/a")
        peer = _num(e["peer"]) if e["peer"] is not None else f"n/a ({e['reasons'].get('peer', '')})"
        rows.append(f"| {TITLES.get(key, key)} | {e['unit']} | {_num(e['ours'])} | {_num(e['limit'])} | {peer} | "
                    f"{vs_limit} | {_ratio(r.get('peer_vs_ours'))} |")
    return "\n".join(rows)


def readme_block(results_dir: Path, root: Path) -> str:
    parts = [BEGIN,
             "<!-- generated by `python -m benchmarks ... --readme` from benchmarks/results/*/results.json; "
             "do not edit by hand -->"]
    runs = sorted(results_dir.glob("*/results.json"))
    if not runs:
        parts.append("No results yet: run `python -m benchmarks --preset realistic --out benchmarks/out --readme`.")
    for path in runs:
        results = json.loads(path.read_text())
        m = results["model"]
        rel = path.parent.relative_to(root).as_posix()
        parts += [
            "",
            f"**{results['preset']} preset** ({m['preset']}: {m['description']}, {m['dtype']}; random weights), "
            f"{results['device'].upper()}: {label(results['machine'])}; llama.cpp `{results['llama_cpp_commit'][:8]}`, "
            f"peer {results['peer_version'] or 'not run'}; {results['timestamp'][:10]}; medians; "
            f"[results.json]({rel}/results.json)",
            "",
            table(results),
            "",
            "Ratios are cost ratios (time, memory; for images/s the inverse): above 1x the first named costs more.",
            "",
            " ".join(f"![{name[:-4]}]({rel}/{name})" for name in results.get("plots", [])),
        ]
    parts.append(END)
    return "\n".join(parts)


def update_readme(readme: Path, results_dir: Path, root: Path) -> None:
    """Replace the block between the bench markers (or add it at the end) with the current results."""
    text = readme.read_text()
    block = readme_block(results_dir, root)
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)
