"""Run the generalisation protocols for every signal source and method; render Markdown, JSON, PNGs."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routescan.detector.dataset import LabelledSet
from routescan.detector.invariant import environment_kfold
from routescan.detector.methods import TELEMETRY_METHODS, train_method
from routescan.detector.metrics import summarize_scores
from routescan.detector.protocols import Fold, family_folds, lodo_folds

PROTOCOLS = {"lodo": "leave-one-domain-out", "wrapper": "leave-one-wrapper-family-out"}
FPR_GRID = np.linspace(0, 1, 201)
Progress = Callable[[str], None]


def _roc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    return np.interp(FPR_GRID, fpr, tpr)


def _aggregate(per_fold: dict[str, dict[str, Any]]) -> dict[str, float]:
    keys = ("auroc", "auprc", "tpr@1%fpr", "tpr@5%fpr")
    vals = {k: [m[k] for m in per_fold.values() if not np.isnan(m[k])] for k in keys}
    out = {f"mean_{k}": float(np.mean(v)) if v else float("nan") for k, v in vals.items()}
    out["min_auroc"] = float(np.min(vals["auroc"])) if vals["auroc"] else float("nan")
    out["folds"] = len(per_fold)
    return out


def _percentiles(scores: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """Each score's rank among benign scores, 0..1 (0.99 = above 99% of benign requests)."""
    return np.searchsorted(np.sort(benign), scores, side="left") / max(len(benign), 1)


def hard_negative_rates(
    name: str, data: LabelledSet, texts: Mapping[str, str] | None, seed: int
) -> tuple[dict[str, float], np.ndarray]:
    """False-positive rate on hard negatives (never trained on) at thresholds set, like a deployed
    detector's, from out-of-fold benign scores at 1% and 5% FPR."""
    usable = np.flatnonzero(~data.hard_negative)
    train = data.subset(usable)
    env = train.environments()
    oof = np.zeros(len(train))
    for tr, te in environment_kfold(train.y, env, 5, seed):
        scorer, _ = train_method(name, train.subset(tr), texts=texts, seed=seed)
        oof[te] = scorer(train.subset(te))
    scorer, _ = train_method(name, train, texts=texts, seed=seed)
    hard = data.subset(np.flatnonzero(data.hard_negative))
    hard_scores = scorer(hard) if len(hard) else np.zeros(0)
    # thresholds from the out-of-fold scores, applied to a model refit on everything: the usual
    # deployment compromise; the benign FPR column shows how far the refit drifts from the target
    benign_oof = oof[(train.y == 0) & ~train.wrapped]
    out: dict[str, float] = {"hard_negatives": len(hard)}
    for target in (0.01, 0.05):
        thr = float(np.quantile(benign_oof, 1 - target, method="higher"))
        tag = f"{round(target * 100)}%"
        out[f"hard_negative_fpr@{tag}"] = float((hard_scores > thr).mean()) if len(hard) else float("nan")
        out[f"harmful_tpr@{tag}"] = float((oof[train.y == 1] > thr).mean())
    return out, _percentiles(hard_scores, benign_oof)


def evaluate(
    sources: Mapping[str, LabelledSet],
    *,
    texts: Mapping[str, str] | None = None,
    methods: Sequence[str] = TELEMETRY_METHODS,
    text_methods: Sequence[str] = ("length", "tfidf"),
    n_boot: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every (source, method) through both protocols and the hard-negative check.

    Source-independent methods (prompt length, text) run once, on the first source's rows.
    """
    results: dict[str, Any] = {"sources": {}, "shared": {}}
    curves: dict[str, Any] = {}
    dists: dict[str, dict[str, list[float]]] = {}
    first = next(iter(sources))
    for source, data in sources.items():
        folds: list[Fold] = lodo_folds(data, seed=seed) + family_folds(data)
        names = list(methods) + (list(text_methods) if source == first else [])
        for name in names:
            if name == "tfidf" and texts is None:
                continue
            where = results["shared"] if name in text_methods else results["sources"].setdefault(source, {})
            entry: dict[str, Any] = {p: {"folds": {}} for p in PROTOCOLS}
            notes: dict[str, Any] = {}
            for fold in folds:
                if progress:
                    progress(f"{source} / {name} / {fold.protocol}: {fold.held_out}")
                scorer, fit_notes = train_method(name, data.subset(fold.train), texts=texts, seed=seed)
                test = data.subset(fold.test)
                scores = scorer(test)
                entry[fold.protocol]["folds"][fold.held_out] = summarize_scores(
                    test.y, scores, n_boot=n_boot, seed=seed
                )
                if fit_notes:
                    notes[f"{fold.protocol}:{fold.held_out}"] = fit_notes
                curves.setdefault(source if name not in text_methods else "shared", {}).setdefault(
                    name, {}
                ).setdefault(fold.protocol, []).append(_roc(test.y, scores))
                if name == "invariant":
                    pct = _percentiles(scores[test.y == 1], scores[test.y == 0])
                    dists.setdefault(source, {}).setdefault(fold.protocol, []).extend(pct.tolist())
            for p in PROTOCOLS:
                entry[p]["summary"] = _aggregate(entry[p]["folds"])
            if progress:
                progress(f"{source} / {name} / hard negatives")
            entry["hard_negatives"], hard_pct = hard_negative_rates(name, data, texts, seed)
            if name == "invariant":
                dists.setdefault(source, {})["hard negatives"] = hard_pct.tolist()
            entry["fit_notes"] = notes
            where[name] = entry
    results["curves"] = {
        src: {m: {p: np.mean(c, axis=0).tolist() for p, c in by_p.items()} for m, by_p in by_m.items()}
        for src, by_m in curves.items()
    }
    results["distributions"] = dists
    return results


# ------------------------------------------------------------------------------------------ rendering


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float) and np.isnan(x):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _method_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    rows = []
    for source, by_method in results["sources"].items():
        for name, entry in by_method.items():
            rows.append((source, name, entry))
    for name, entry in results["shared"].items():
        rows.append(("(any)" if name == "length" else "prompt text", name, entry))
    return rows


def render_markdown(results: dict[str, Any], *, title: str, preamble: str = "") -> str:
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble.rstrip(), ""]
    lines += [
        "## Summary (mean over held-out groups)",
        "",
        "| signal source | method | LODO AUROC | LODO min | LODO TPR@1% | LODO TPR@5% | wrapper AUROC | "
        "wrapper min | wrapper TPR@1% | wrapper TPR@5% | hard-neg FPR @1% / @5% thresholds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for source, name, e in _method_rows(results):
        lo, wr, hn = e["lodo"]["summary"], e["wrapper"]["summary"], e["hard_negatives"]
        lines.append(
            f"| {source} | {name} | {_fmt(lo['mean_auroc'])} | {_fmt(lo['min_auroc'])} | "
            f"{_fmt(lo['mean_tpr@1%fpr'])} | {_fmt(lo['mean_tpr@5%fpr'])} | {_fmt(wr['mean_auroc'])} | "
            f"{_fmt(wr['min_auroc'])} | {_fmt(wr['mean_tpr@1%fpr'])} | {_fmt(wr['mean_tpr@5%fpr'])} | "
            f"{_fmt(hn['hard_negative_fpr@1%'])} / {_fmt(hn['hard_negative_fpr@5%'])} |"
        )
    for protocol, label in PROTOCOLS.items():
        lines += [
            "",
            f"## {label}: per held-out group (AUROC [95% bootstrap CI] / AUPRC / TPR@1% / TPR@5%)",
            "",
        ]
        rows = _method_rows(results)
        groups = sorted({g for _, _, e in rows for g in e[protocol]["folds"]})
        lines.append("| group | n harmful / benign | " + " | ".join(f"{s}: {m}" for s, m, _ in rows) + " |")
        lines.append("|---|---|" + "---|" * len(rows))
        for g in groups:
            cells = []
            counts = ""
            for _, _, e in rows:
                m = e[protocol]["folds"].get(g)
                if m is None:
                    cells.append("")
                    continue
                counts = f"{m['n_harmful']} / {m['n_benign']}"
                ci = m.get("auroc_ci95", [float("nan")] * 2)
                cells.append(
                    f"{_fmt(m['auroc'])} [{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}] / {_fmt(m['auprc'])} / "
                    f"{_fmt(m['tpr@1%fpr'], 2)} / {_fmt(m['tpr@5%fpr'], 2)}"
                )
            lines.append(f"| {g} | {counts} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_figures(results: dict[str, Any], out_dir: Path, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name: str) -> Path:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        return out_dir / name

    curves = results["curves"]
    shared = curves.get("shared", {})
    for source, by_method in curves.items():
        if source == "shared":
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
        for ax, (protocol, label) in zip(axes, PROTOCOLS.items(), strict=True):
            for name, by_p in {**by_method, **shared}.items():
                if protocol in by_p:
                    auc = (results["sources"].get(source, {}).get(name) or results["shared"][name])[protocol][
                        "summary"
                    ]["mean_auroc"]
                    ax.plot(FPR_GRID, by_p[protocol], label=f"{name} ({auc:.3f})")
            ax.plot([0, 1], [0, 1], ":", color="grey")
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlim(0, 1)
            ax.set_title(f"{source}: {label}", fontsize=9)
            ax.set_xlabel("false-positive rate (log below 1%)")
            ax.set_ylabel("true-positive rate (mean over held-out groups)")
            ax.legend(fontsize=7, loc="lower right")
        paths.append(save(fig, f"{prefix}-roc-{source}.png"))
    for source, by_set in results.get("distributions", {}).items():
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        bins = np.linspace(0, 1, 41)
        for label, values in by_set.items():
            if values:
                ax.hist(
                    values,
                    bins=bins,
                    histtype="step",
                    density=True,
                    linewidth=1.5,
                    label=f"{PROTOCOLS.get(label, label)} ({len(values)})",
                )
        ax.axvline(0.99, color="grey", linestyle=":", label="1% FPR")
        ax.set_xlabel("score rank among held-out benign requests (invariant detector)")
        ax.set_ylabel("density")
        ax.set_title(f"{source}: held-out harmful requests and hard negatives", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        paths.append(save(fig, f"{prefix}-scores-{source}.png"))
    return paths


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
