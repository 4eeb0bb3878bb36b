"""PNG plots of a run: time and memory per case and implementation (log scale)."""

from __future__ import annotations

import pathlib

from jevo.bench.report import GIB, PASS_TITLES


def _bars(ax, records, value, ylabel):
  """Grouped bars, one group per case and one bar per implementation that measured something;
  each bar labelled with its value."""
  cases = list(dict.fromkeys(r["case"] for r in records))
  measured = [r for r in records if r["status"] == "ok" and (value(r) or 0) > 0]
  labels = list(dict.fromkeys(r["label"] for r in measured))
  width = 0.8 / max(len(labels), 1)
  for i, label in enumerate(labels):
    xs, heights = [], []
    for c, case in enumerate(cases):
      r = next((r for r in measured if r["case"] == case and r["label"] == label), None)
      if r is not None:
        xs.append(c + i * width)
        heights.append(value(r))
    bars = ax.bar(xs, heights, width, label=label)
    ax.bar_label(bars, fmt="%.3g", fontsize=6, rotation=90, padding=2)
  ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, rotation=15)
  if measured:
    values = [value(r) for r in measured]
    ax.set_yscale("log")
    ax.set_ylim(min(values) / 3, max(values) * 4)
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
  ax.set_ylabel(ylabel)


def plot(results: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Writes time.png and memory.png into `out_dir`; returns their paths. Memory is the
  allocator's peak on a GPU, XLA's temp bytes where there are no allocator statistics."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = results["records"]
  on_gpu = results["meta"]["platform"] == "gpu"
  title = f"{results['preset']} on {results['meta']['device_kind']}, {results['date']}"

  def memory(r):
    if on_gpu:
      return (r.get("peak_bytes") or 0) / GIB
    return (r.get("xla", {}).get("temp_size") or 0) / GIB

  paths = []
  for name, value, ylabel in (
      ("time.png", lambda r: r["ms"], "median ms (log)"),
      ("memory.png", memory,
       "peak GiB above inputs (log)" if on_gpu else "XLA temp GiB (log; no allocator on CPU)")):
    passes = [p for p in PASS_TITLES if any(r["pass"] == p for r in records)]
    kinds = [k for k in ("attention", "block") if any(r["kind"] == k for r in records)]
    fig, axes = plt.subplots(len(kinds), len(passes), figsize=(7 * len(passes), 4.2 * len(kinds)),
                             squeeze=False)
    for row, kind in enumerate(kinds):
      for col, p in enumerate(passes):
        ax = axes[row][col]
        subset = [r for r in records if r["kind"] == kind and r["pass"] == p]
        _bars(ax, subset, value, ylabel)
        ax.set_title(f"{kind}, {PASS_TITLES[p]}")
    fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
