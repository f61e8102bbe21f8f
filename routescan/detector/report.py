"""Run the generalisation protocols for every signal source and method; render Markdown, JSON, PNGs."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routescan.detector.content import Content, as_content
from routescan.detector.dataset import LabelledSet
from routescan.detector.methods import CONTENT_METHODS, TELEMETRY_METHODS, train_method
from routescan.detector.metrics import auroc, fpr_threshold, summarize_scores
from routescan.detector.protocols import Fold, family_folds, hard_negative_folds, lodo_folds, source_folds

PROTOCOLS = {
    "lodo": "leave-one-domain-out",
    "wrapper": "leave-one-wrapper-family-out",
    "source": "leave-one-source-out (unseen real users)",
    "hard_negative": "hard negatives of a held-out source",
}
# the protocols whose per-fold tables are AUROC-first (the others are read at operating points)
RANKED = ("lodo", "wrapper")
FPR_GRID = np.linspace(0, 1, 201)
Progress = Callable[[str], None]


def _roc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    return np.interp(FPR_GRID, fpr, tpr)


def _aggregate(per_fold: dict[str, dict[str, Any]]) -> dict[str, float]:
    keys = ("auroc", "auprc", "tpr@1%fpr", "tpr@5%fpr", "benign_fpr@1%", "harmful_tpr@1%")
    vals = {k: [m[k] for m in per_fold.values() if k in m and not np.isnan(m[k])] for k in keys}
    out = {f"mean_{k}": float(np.mean(v)) if v else float("nan") for k, v in vals.items()}
    out["min_auroc"] = float(np.min(vals["auroc"])) if vals["auroc"] else float("nan")
    out["folds"] = len(per_fold)
    return out


def _percentiles(scores: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """Each score's rank among benign scores, 0..1 (0.99 = above 99% of benign requests)."""
    return np.searchsorted(np.sort(benign), scores, side="left") / max(len(benign), 1)


def operating_rates(
    y_test: np.ndarray, s_test: np.ndarray, y_cal: np.ndarray, s_cal: np.ndarray
) -> dict[str, float]:
    """Rates at thresholds set, as a deployed detector's are, on the calibration slice's benign
    scores (1% and 5% FPR there): the held-out traffic's benign FPR and harmful TPR at them (the
    calibration slice's harmful TPR when the held-out traffic has no harmful row)."""
    out: dict[str, float] = {}
    benign_cal = s_cal[y_cal == 0]
    for target in (0.01, 0.05):
        thr = fpr_threshold(benign_cal, target)
        tag = f"{round(target * 100)}%"
        neg, pos = s_test[y_test == 0], s_test[y_test == 1]
        out[f"benign_fpr@{tag}"] = float((neg > thr).mean()) if neg.size else float("nan")
        out[f"harmful_tpr@{tag}"] = float(
            (pos > thr).mean() if pos.size else (s_cal[y_cal == 1] > thr).mean()
        )
    if not (y_test == 1).any():
        # hard negatives against the calibration slice's harmful rows: can the detector tell them apart
        both = np.concatenate([s_cal[y_cal == 1], s_test])
        out["auroc_vs_harmful"] = auroc(np.r_[np.ones((y_cal == 1).sum()), np.zeros(len(s_test))], both)
    return out


def all_folds(data: LabelledSet, seed: int) -> list[Fold]:
    return (
        lodo_folds(data, seed=seed)
        + family_folds(data)
        + source_folds(data, seed=seed)
        + hard_negative_folds(data, seed=seed)
    )


def _fold_metrics(test: LabelledSet, scores: np.ndarray, cal, cal_scores, n_boot, seed):
    if len(np.unique(test.y)) == 2:
        metrics: dict[str, Any] = summarize_scores(test.y, scores, n_boot=n_boot, seed=seed)
        metrics["prevalence"] = float(test.y.mean())
    else:
        metrics = {"n_harmful": int(test.y.sum()), "n_benign": int((test.y == 0).sum())}
    if cal is not None:
        metrics.update(operating_rates(test.y, scores, cal.y, cal_scores))
    return metrics


def window_pooling(
    data: LabelledSet, folds: Sequence[Fold], *, seed: int = 0, progress: Progress | None = None
) -> dict[str, Any]:
    """Long prompts: one request score against window-pooled ones, per fold (logistic regression).

    - ``request``: the whole prompt's fingerprint;
    - ``max``: the largest of the request's score and its windows' scores, by the same model;
    - ``record``: a model on a fixed-length record per request, its fingerprint beside the
      feature-wise maximum over its windows (:meth:`LabelledSet.window_max`).
    """
    from routescan.detector.methods import logreg_pipeline

    if not any(len(w) for w in data.windows):
        return {}
    record = np.concatenate([data.X, data.window_max()], axis=1)
    out: dict[str, Any] = {p: {"folds": {}} for p in ("lodo", "wrapper")}
    for fold in folds:
        if fold.protocol not in out:
            continue
        if progress:
            progress(f"windows / {fold.protocol}: {fold.held_out}")
        train, test = data.subset(fold.train), data.subset(fold.test)
        whole = logreg_pipeline(seed).fit(train.X, train.y)
        request = whole.decision_function(test.X)
        # every test window scored in one call, then the max per request (requests without windows
        # keep their own score)
        sizes = np.array([len(w) for w in test.windows])
        pooled = request.copy()
        if sizes.any():
            scored = whole.decision_function(np.concatenate(list(test.windows[sizes > 0])).astype(np.float64))
            starts = np.concatenate(([0], np.cumsum(sizes[sizes > 0])[:-1]))
            pooled[sizes > 0] = np.maximum(request[sizes > 0], np.maximum.reduceat(scored, starts))
        rec = logreg_pipeline(seed).fit(record[fold.train], train.y)
        out[fold.protocol]["folds"][fold.held_out] = {
            name: summarize_scores(test.y, sc, n_boot=0)
            for name, sc in (
                ("request", request),
                ("max", pooled),
                ("record", rec.decision_function(record[fold.test])),
            )
        }
    for entry in out.values():
        entry["summary"] = {
            name: {
                k: float(np.mean([f[name][k] for f in entry["folds"].values()]))
                for k in ("auroc", "tpr@1%fpr")
            }
            for name in ("request", "max", "record")
        }
    share = float(np.mean([len(w) > 0 for w in data.windows]))
    out["meta"] = {"requests_with_windows": share, "windows": int(sum(len(w) for w in data.windows))}
    return out


def evaluate(
    sources: Mapping[str, LabelledSet],
    *,
    texts: Content | Mapping[str, str] | None = None,
    methods: Sequence[str] = TELEMETRY_METHODS,
    text_methods: Sequence[str] = ("length", "tfidf", "minilm"),
    windows: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every (source, method) through every protocol of :func:`all_folds`.

    Source-independent methods (prompt length, text) run once, on the first source's rows; the
    content baselines are skipped without texts. Window pooling runs on the first source.
    """
    content = as_content(texts)
    results: dict[str, Any] = {"sources": {}, "shared": {}}
    curves: dict[str, Any] = {}
    dists: dict[str, dict[str, list[float]]] = {}
    first = next(iter(sources))
    for source, data in sources.items():
        folds = all_folds(data, seed)
        names = list(methods) + (list(text_methods) if source == first else [])
        for name in names:
            if name in CONTENT_METHODS and content is None:
                continue
            where = results["shared"] if name in text_methods else results["sources"].setdefault(source, {})
            entry: dict[str, Any] = {p: {"folds": {}} for p in PROTOCOLS}
            notes: dict[str, Any] = {}
            for fold in folds:
                if progress:
                    progress(f"{source} / {name} / {fold.protocol}: {fold.held_out}")
                scorer, fit_notes = train_method(name, data.subset(fold.train), texts=content, seed=seed)
                test = data.subset(fold.test)
                scores = scorer(test)
                cal = data.subset(fold.calibration) if fold.calibration is not None else None
                cal_scores = scorer(cal) if cal is not None else None
                entry[fold.protocol]["folds"][fold.held_out] = _fold_metrics(
                    test, scores, cal, cal_scores, n_boot, seed
                )
                if fit_notes:
                    notes[f"{fold.protocol}:{fold.held_out}"] = fit_notes
                if fold.protocol in ("lodo", "wrapper"):
                    curves.setdefault(source if name not in text_methods else "shared", {}).setdefault(
                        name, {}
                    ).setdefault(fold.protocol, []).append(_roc(test.y, scores))
                if name == "logreg" and cal is not None:
                    pct = _percentiles(scores, cal_scores[cal.y == 0])
                    for cls, label in ((0, "benign"), (1, "harmful")):
                        if (test.y == cls).any():
                            dists.setdefault(source, {})[f"{fold.held_out}: {label}"] = pct[
                                test.y == cls
                            ].tolist()
            for p in PROTOCOLS:
                entry[p]["summary"] = _aggregate(entry[p]["folds"])
            entry["fit_notes"] = notes
            where[name] = entry
        if windows and source == first:
            results["windows"] = window_pooling(data, folds, seed=seed, progress=progress)
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


def _get(entry: dict[str, Any], protocol: str, fold: str | None, key: str) -> float:
    block = entry.get(protocol, {})
    where = block.get("summary", {}) if fold is None else block.get("folds", {}).get(fold, {})
    value = where.get(key, float("nan"))
    return float(value) if value is not None else float("nan")


# (label, protocol, fold or None for the mean over folds, metric, goal, higher is better)
GOALS: tuple[tuple[str, str, str | None, str, float, bool], ...] = (
    ("unseen real users (ToxicChat left out): AUROC", "source", "toxicchat", "auroc", 0.90, True),
    ("unseen real users: AUPRC at its own prevalence", "source", "toxicchat", "auprc", 0.63, True),
    ("unseen real users: benign FPR at the 1% point", "source", "toxicchat", "benign_fpr@1%", 0.02, False),
    ("wrapper families: mean AUROC", "wrapper", None, "mean_auroc", 0.96, True),
    (
        "held-out hard negatives (CoCoNot): FPR at 1%",
        "hard_negative",
        "coconot (trained)",
        "benign_fpr@1%",
        0.15,
        False,
    ),
    (
        "held-out hard negatives (XSTest + JBB benign): FPR at 1%",
        "hard_negative",
        "xstest+jbb_benign (trained)",
        "benign_fpr@1%",
        0.15,
        False,
    ),
    ("LODO: mean AUROC", "lodo", None, "mean_auroc", 0.97, True),
)


def goals_table(results: dict[str, Any], *, source: str, method: str) -> list[str]:
    entry = results["sources"][source][method]
    shared = results["shared"]
    content = [m for m in ("tfidf", "minilm") if m in shared]
    lines = [
        f"| goal ({source} / {method}) | target | telemetry | met? | "
        + " | ".join(f"text: {m}" for m in content)
        + " |",
        "|---|---|---|---|" + "---|" * len(content),
    ]
    for label, protocol, fold, key, goal, higher in GOALS:
        value = _get(entry, protocol, fold, key)
        met = "n/a" if np.isnan(value) else ("yes" if (value >= goal if higher else value <= goal) else "no")
        if met == "no":
            met = f"no (by {abs(value - goal):.3f})"
        lines.append(
            f"| {label} | {'>=' if higher else '<='} {goal:g} | {_fmt(value)} | {met} | "
            + " | ".join(_fmt(_get(shared[m], protocol, fold, key)) for m in content)
            + " |"
        )
    return lines


def render_markdown(
    results: dict[str, Any], *, title: str, preamble: str = "", primary: tuple[str, str] | None = None
) -> str:
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble.rstrip(), ""]
    if primary is not None and primary[1] in results["sources"].get(primary[0], {}):
        lines += ["## Goals (issue #17)", "", *goals_table(results, source=primary[0], method=primary[1]), ""]
    hn_folds = sorted({g for _, _, e in _method_rows(results) for g in e["hard_negative"]["folds"]})
    lines += [
        "## Summary (mean over held-out groups)",
        "",
        "| signal source | method | LODO AUROC | LODO min | LODO TPR@1% | wrapper AUROC | wrapper min | "
        "wrapper TPR@1% | ToxicChat AUROC | ToxicChat AUPRC | ToxicChat benign FPR @1% point | "
        + " | ".join(f"hard-neg FPR @1%: {g}" for g in hn_folds)
        + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(hn_folds),
    ]
    for source, name, e in _method_rows(results):
        lo, wr = e["lodo"]["summary"], e["wrapper"]["summary"]
        tc = e["source"]["folds"].get("toxicchat", {})
        lines.append(
            f"| {source} | {name} | {_fmt(lo['mean_auroc'])} | {_fmt(lo['min_auroc'])} | "
            f"{_fmt(lo['mean_tpr@1%fpr'])} | {_fmt(wr['mean_auroc'])} | {_fmt(wr['min_auroc'])} | "
            f"{_fmt(wr['mean_tpr@1%fpr'])} | {_fmt(tc.get('auroc', float('nan')))} | "
            f"{_fmt(tc.get('auprc', float('nan')))} | {_fmt(tc.get('benign_fpr@1%', float('nan')))} | "
            + " | ".join(_fmt(_get(e, "hard_negative", g, "benign_fpr@1%")) for g in hn_folds)
            + " |"
        )
    lines += _source_tables(results) + _hard_negative_tables(results) + _window_tables(results)
    for protocol in RANKED:
        label = PROTOCOLS[protocol]
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


def _source_tables(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for src in sorted({g for _, _, e in _method_rows(results) for g in e["source"]["folds"]}):
        lines += [
            "",
            f"## {PROTOCOLS['source']}: {src}",
            "",
            "Trained on every other source; thresholds set on a held-out slice of the training world's "
            "plain requests (its 1% / 5% FPR points), then applied to all of this source's requests.",
            "",
            "| signal source | method | n harmful / benign | AUROC [95% CI] | AUPRC (prevalence) | "
            "TPR@1% (own) | benign FPR @1% point | harmful TPR @1% point | benign FPR @5% point | "
            "harmful TPR @5% point |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for source, name, e in _method_rows(results):
            m = e["source"]["folds"].get(src)
            if m is None:
                continue
            ci = m.get("auroc_ci95", [float("nan")] * 2)
            lines.append(
                f"| {source} | {name} | {m['n_harmful']} / {m['n_benign']} | {_fmt(m['auroc'])} "
                f"[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}] | {_fmt(m['auprc'])} ({_fmt(m['prevalence'], 2)}) | "
                f"{_fmt(m['tpr@1%fpr'])} | {_fmt(m['benign_fpr@1%'])} | {_fmt(m['harmful_tpr@1%'])} | "
                f"{_fmt(m['benign_fpr@5%'])} | {_fmt(m['harmful_tpr@5%'])} |"
            )
    return lines


def _hard_negative_tables(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## {PROTOCOLS['hard_negative']}",
        "",
        "Each fold holds out a source whole; its hard negatives are the test set. *trained*: the other "
        "sources' hard negatives train as benign; *none trained*: the control, no hard negative in "
        "training. FPR at the thresholds of a held-out calibration slice; harmful TPR on that slice; "
        "AUROC of the slice's harmful requests against the held-out hard negatives.",
        "",
        "| signal source | method | fold | n | FPR @1% | FPR @5% | harmful TPR @1% | AUROC vs harmful |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for source, name, e in _method_rows(results):
        for fold, m in e["hard_negative"]["folds"].items():
            lines.append(
                f"| {source} | {name} | {fold} | {m['n_benign']} | {_fmt(m['benign_fpr@1%'])} | "
                f"{_fmt(m['benign_fpr@5%'])} | {_fmt(m['harmful_tpr@1%'])} | "
                f"{_fmt(m.get('auroc_vs_harmful', float('nan')))} |"
            )
    return lines


def _window_tables(results: dict[str, Any]) -> list[str]:
    win = results.get("windows") or {}
    if not win:
        return []
    meta = win["meta"]
    lines = [
        "",
        "## Long prompts: window pooling (logistic regression, first signal source)",
        "",
        f"{meta['requests_with_windows']:.0%} of requests are longer than one window "
        f"({meta['windows']} windows in all). *request*: the whole prompt's fingerprint; *max*: the "
        "highest of the request's and its windows' scores (same model); *record*: a model on the "
        "fingerprint beside the feature-wise max over windows (one fixed-length record per request).",
        "",
        "| protocol | held out | request AUROC | max AUROC | record AUROC | request TPR@1% | max TPR@1% | "
        "record TPR@1% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for protocol in ("wrapper", "lodo"):
        block = win.get(protocol, {})
        rows = [*block.get("folds", {}).items(), ("**mean**", block.get("summary", {}))]
        for fold, m in rows:
            if not m:
                continue
            lines.append(
                f"| {protocol} | {fold} | "
                + " | ".join(_fmt(m[v]["auroc"]) for v in ("request", "max", "record"))
                + " | "
                + " | ".join(_fmt(m[v]["tpr@1%fpr"]) for v in ("request", "max", "record"))
                + " |"
            )
    return lines


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
        for ax, protocol in zip(axes, RANKED, strict=True):
            label = PROTOCOLS[protocol]
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
                    label=f"{label} ({len(values)})",
                )
        ax.axvline(0.99, color="grey", linestyle=":", label="1% FPR")
        ax.set_xlabel("score rank among the calibration slice's benign requests (logistic regression)")
        ax.set_ylabel("density")
        ax.set_title(f"{source}: held-out sources and hard negatives", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        paths.append(save(fig, f"{prefix}-scores-{source}.png"))
    return paths


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
