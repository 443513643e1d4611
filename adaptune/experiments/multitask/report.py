"""Tables and the plot of multitask runs: one run's results, or many runs side by side (seed 004
Tables 2-3), and dev average against % parameters updated per task (seed 004 Figure 1)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ...files import atomic_write
from ..common.tables import markdown, table


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return f"{x:.3g}%" if x < 10 else f"{x:.1f}%"


def datasets(results: list[dict]) -> list[str]:
    return list(dict.fromkeys(t for r in results for t in r["tasks"]))


def relative_to_full(results: list[dict], run: dict | None = None) -> float | None:
    """The reference of the '% of full' column: the best dev average among the full fine-tuning runs
    on the same datasets and model as `run` (any, if run is None); None when there is none."""
    def key(r: dict) -> tuple:
        return tuple(r["tasks"]), r["model"]["name"]
    full = [r["dev_average"] for r in results
            if r.get("method") == "full" and (run is None or key(r) == key(run))]
    return max(full) if full else None


def _lr_note(result: dict) -> str:
    """', lr=...' when the run's learning rate is not its method's default, else ''."""
    from ..common.methods import COMPONENT_LR, DEFAULT_LR
    cfg = result.get("config", {})
    lr, method = cfg.get("lr"), result.get("method")
    if lr is None or method in (None, "head-only") or lr == DEFAULT_LR.get(method, COMPONENT_LR):
        return ""
    return f", lr={lr:g}"


def _setting_note(result: dict) -> str:
    """', mixed batches' and ', nf4' (the base's quantization) as the run has them, else ''."""
    cfg = result.get("config", {})
    return (", mixed batches" if cfg.get("batching") == "mixed" else "") + \
        (f", {cfg['quantize']}" if cfg.get("quantize") else "")


def run_label(result: dict) -> str:
    """The method's label, with the learning rate when it is not the method's default, mixed batching and the
    base's quantization (--quantize)."""
    note = _lr_note(result) + _setting_note(result)
    label = result["label"]
    return (label[:-1] + note + "]" if label.endswith("]") else f"{label}[{note[2:]}]") if note else label


def run_table(result: dict) -> Table:
    """One run: per-dataset dev metrics and % updated, then the average; costs in the caption."""
    table = Table("dataset", "metric", "dev", "other metrics", "% params updated", "train loss by epoch",
                  title=f"{run_label(result)} ({result['sharing']}) on {result['model']['name']}")
    for t, r in result["tasks"].items():
        others = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if k != r["metric"])
        losses = " → ".join(_fmt(x) for x in r["train_loss_by_epoch"])
        table.add_row(t, r["metric"], _fmt(r["dev"]), others, _pct(r["pct_updated"]), losses)
    table.add_row("[bold]average[/bold]", "", f"[bold]{_fmt(result['dev_average'])}[/bold]", "",
                  _pct(result["pct_updated_mean"]), "")
    table.caption = (f"% stored {_pct(result['params']['pct_stored'])} of {result['params']['base']:,} base params | "
                     f"peak memory {result['peak_memory_mb']:.0f} MiB | train {_fmt(result['train_examples_per_s'], 1)} "
                     f"ex/s, eval {_fmt(result['eval_examples_per_s'], 1)} ex/s | wall {result['wall_s']:.1f} s")
    return table


def rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows across runs (sorted by % updated), for rich and markdown alike."""
    names = datasets(results)
    head = ["method", "sharing", "dev avg", *names, "% of full", "% updated/task", "% stored", "train ex/s",
            "peak MiB", "wall s"]
    out = []
    for r in sorted(results, key=lambda r: (r["pct_updated_mean"], run_label(r))):
        cells = [_fmt(r["tasks"][t]["dev"]) if t in r["tasks"] else "-" for t in names]
        full = relative_to_full(results, r)
        share = f"{100 * r['dev_average'] / full:.1f}%" if full else "-"
        out.append([run_label(r), r["sharing"], _fmt(r["dev_average"]), *cells, share, _pct(r["pct_updated_mean"]),
                    _pct(r["params"]["pct_stored"]), _fmt(r["train_examples_per_s"], 1),
                    f"{r['peak_memory_mb']:.0f}", f"{r['wall_s']:.0f}"])
    return head, out


def runs_table(results: list[dict]) -> Table:
    return table(*rows(results), title="multitask runs (dev)")


def markdown_table(results: list[dict]) -> str:
    return markdown(*rows(results))


def plot(results: list[dict], path: str | Path) -> Path:
    """PNG: dev average against % parameters updated per task (log x); runs of one method (and
    sharing) joined by a line in order of size, one colour per method, dashed for a non-default
    learning rate; full fine-tuning and head-only also drawn as dotted levels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    families: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        families.setdefault((r.get("method", r["label"]), r["sharing"], _lr_note(r) + _setting_note(r)), []).append(r)
    methods = sorted({m for m, _, _ in families})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for (method, sharing, note), runs in sorted(families.items()):
        runs = sorted(runs, key=lambda r: r["pct_updated_mean"])
        xs = [max(r["pct_updated_mean"], 1e-4) for r in runs]
        ys = [r["dev_average"] for r in runs]
        label = method if sharing in ("-", "shared") or method in ("full", "lora+adapter") else f"{method} ({sharing})"
        label += f" ({note[2:]})" if note else ""
        colour = colours[method]
        ax.plot(xs, ys, marker="s" if note else "o", linestyle="--" if note else "-", color=colour, label=label)
        if method in ("full", "head-only") and not note:
            ax.axhline(ys[0], color=colour, linestyle=":", linewidth=0.8)
        for r, x, y in zip(runs, xs, ys):
            arg = r["label"][len(method):].strip("[]") if r["label"].startswith(method) else r["label"]
            if arg:
                ax.annotate(arg, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("% parameters updated per task (components + head; log scale)")
    ax.set_ylabel("dev average (SST acc, paraphrase acc, STS Pearson r)"
                  if set(datasets(results)) == {"sst", "para", "sts"} else "dev average")
    model = {r["model"]["name"] for r in results}
    ax.set_title(f"multitask dev average vs trainable parameters ({', '.join(sorted(model))})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
