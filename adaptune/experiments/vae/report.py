"""Tables and plots of `adaptune run vae` runs: the runs side by side (seed 001 Tables 1-2), the test
metrics against the free-bits threshold λ, and the training curves (reconstruction, KL, β)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ...files import atomic_write
from ..common.tables import markdown, table
from .results import is_vae as is_vae  # read and checked in results.py, as load_run reads

HEAD = ["run", "corpus", "base", "posterior", "injection", "placement", "prefix", "fine-tuned", "λ", "% trainable",
        "PPL", "PPL (Optimus tokens)", "-ELBO", "MI", "AU", "base PPL", "steps", "train s"]


def _lam(r: dict) -> float:
    return float(r["config"]["training"]["free_bits"])


def _setting(r: dict) -> tuple:
    """What a run is apart from λ: the λ sweep joins runs that agree on it."""
    c, v = r["config"], r["config"]["vae"]
    return (c["corpus"], c["base"], c.get("quantize"), v["latent_gen"], v["injection"], v["placement"], v.get("prefix", 0),
            bool(v.get("finetune")), v.get("latent_dim"), c.get("steps"), c.get("batch_size"), c["training"].get("lr"))


def label(r: dict) -> str:
    c, v = r["config"], r["config"]["vae"]
    parts = ["LG" if v["latent_gen"] == "pool" else "LA", v["injection"].upper(), v["placement"]]
    parts += [f"prefix {v['prefix']}"] if v.get("prefix") else []
    parts += ["fine-tuned"] if v.get("finetune") else []
    parts += [c["quantize"]] if c.get("quantize") else []
    return f"{c['corpus']} · {' · '.join(parts)}"


def base(config: dict) -> str:
    """The base's name, and its quantization (--quantize) if any: 'tiny-llama (nf4)'."""
    name = Path(config["base"]).name
    return f"{name} ({config['quantize']})" if config.get("quantize") else name


def lambda_groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by everything but λ, each group sorted by λ; only groups with two λ or more."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(_setting(r), []).append(r)
    return {k: sorted(g, key=_lam) for k, g in groups.items() if len({_lam(r) for r in g}) > 1}


def rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (by corpus, base, then PPL), for rich and markdown alike."""
    out = []
    for r in sorted(results, key=lambda r: (r["config"]["corpus"], r["config"]["base"], r["test"]["ppl"])):
        c, v, t = r["config"], r["config"]["vae"], r["test"]
        out.append([r["name"], c["corpus"], base(c), "LG (pool)" if v["latent_gen"] == "pool" else
                    "Latent Attention", v["injection"], v["placement"], str(v.get("prefix") or "-"),
                    "yes" if v.get("finetune") else "no", f"{_lam(r):g}", f"{r['params']['pct_trainable']:.2f}%",
                    f"{t['ppl']:.2f}", f"{t['ppl_optimus_tokens']:.2f}", f"{t['neg_elbo']:.2f}", f"{t['mi']:.3f}",
                    str(t["au"]), f"{t['base_ppl']:.2f}", str(c.get("steps", "-")), f"{r.get('train_s', 0):.0f}"])
    return HEAD, out


TERMINAL = ("run", "corpus", "λ", "% trainable", "PPL", "-ELBO", "MI", "AU", "base PPL")  # the markdown has all


def runs_table(results: list[dict]) -> Table:
    return table(*rows(results), title="VAE runs (test split; the markdown table has every column)", columns=TERMINAL)


def markdown_table(results: list[dict]) -> str:
    return markdown(*rows(results))


def save_png(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_lambda(results: list[dict], path: str | Path) -> Path | None:
    """PNG: test PPL, MI and AU against λ, one line per group of runs differing only in λ; None (nothing
    written) when no group has two λ values."""
    groups = lambda_groups(results)
    if not groups:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for runs in groups.values():
        xs = [_lam(r) for r in runs]
        for ax, key in zip(axes, ("ppl", "mi", "au")):
            ax.plot(xs, [r["test"][key] for r in runs], marker="o", label=label(runs[0]))
    for ax, name in zip(axes, ("PPL (importance-weighted, scored tokens)", "MI", "AU (active units)")):
        ax.set_xlabel("free-bits threshold λ")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def _smooth(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def plot_curves(results: list[dict], path: str | Path) -> Path:
    """PNG: reconstruction and KL (running means over ~2% of the steps) and β against the step, one line
    per run; a dotted line where the decoder's components join."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for r in results:
        h = r["history"]
        if not h:
            continue
        steps, width = [row["step"] for row in h], max(1, len(h) // 50)
        line = axes[0].plot(steps, _smooth([row["rec"] for row in h], width), linewidth=1, label=r["name"])[0]
        axes[1].plot(steps, _smooth([row["kl"] for row in h], width), linewidth=1, color=line.get_color())
        axes[2].plot(steps, [row["beta"] for row in h], linewidth=1, color=line.get_color())
        joined = next((row["step"] for row in h if row.get("decoder")), None)
        if joined is not None:
            for ax in axes:
                ax.axvline(joined, color=line.get_color(), linestyle=":", linewidth=0.8)
    for ax, name in zip(axes, ("reconstruction −log p(x|z) per sentence", "KL(q(z|x) ‖ p(z)) per sentence", "β")):
        ax.set_ylabel(name, fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[2].set_xlabel("training step (dotted: the decoder's components join)")
    axes[0].legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    return save_png(fig, path)
