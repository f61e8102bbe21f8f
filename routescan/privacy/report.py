"""docs/privacy.md: the inversion attacks' results as tables and one figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render(results: dict[str, Any], *, command: str, figure: str | None) -> str:
    w, r, v = results["word_recovery"], results["retrieval"], results["revealed"]
    lines = [
        "# Privacy: what a routing fingerprint gives away",
        "",
        f"Model `{results['model_id']}`, signal source `{results['launch_model']}`; "
        f"{results['rows']} prompts ({results['train_rows']} attacker-training / "
        f"{results['test_rows']} held-out). Written by:",
        "",
        f"```bash\n{command}\n```",
        "",
        "## Content-word recovery",
        "",
        f"Which of the {w['vocabulary']} most frequent content words (stop words removed) occur in a "
        "held-out prompt; micro-averaged over prompts and words. The text rows are the same attackers "
        "given the prompt's TF-IDF: the upper reference for what a content-reading auditor learns.",
        "",
        "| attacker input / model | precision | recall | F1 |",
        "|---|---|---|---|",
    ]
    for name, m in w.items():
        if isinstance(m, dict):
            lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |")
    lines += [
        "",
        "## Prompt retrieval",
        "",
        "Given one held-out fingerprint, rank a pool of candidate prompts (the true one plus random others). "
        "*Learned*: the attacker has no model access; it learned a map from fingerprints to a text "
        "embedding (ridge onto TF-IDF + SVD) on its training prompts. *Model access*: the attacker runs each "
        "candidate through the same model and matches fingerprints (a dictionary attack).",
        "",
        "| pool | chance top-1 | learned top-1 | model access top-1 | chance top-10 | learned top-10 | "
        "model access top-10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool, m in r.items():
        lines.append(
            f"| {pool} | {m['chance_top1']:.3f} | {m['learned_top1']:.3f} | {m['model_access_top1']:.3f} | "
            f"{m['chance_top10']:.3f} | {m['learned_top10']:.3f} | {m['model_access_top10']:.3f} |"
        )
    lines += [
        "",
        "## What the fingerprint does reveal",
        "",
        "| property | attacker | baseline |",
        "|---|---|---|",
    ]
    if "length" in v:
        lv = v["length"]
        lines.append(
            f"| prompt length (tokens) | MAE {lv['mae_tokens']:.1f}, R² (log) {lv['r2_log_tokens']:.3f} | "
            f"MAE {lv['baseline_mae_tokens']:.1f} (predict the mean) |"
        )
    for key, label in (("source", "source benchmark"), ("harm_domain", "harm domain (harmful rows)")):
        if key in v:
            lines.append(
                f"| {label} ({v[key]['classes']} classes) | accuracy {v[key]['accuracy']:.3f} | "
                f"{v[key]['majority_baseline']:.3f} (majority class) |"
            )
    if figure:
        lines += ["", f"![attack summary]({figure})"]
    lines += [
        "",
        "## Reading these numbers, and the stronger threat RouteScan does not expose",
        "",
        "- A fingerprint is a deterministic function of the prompt. Anyone who can run the same model on a "
        "list of guesses can confirm an exact guess (the model-access rows). RouteScan therefore treats "
        "fingerprints as sensitive metadata: full ones stay on the serving host, and what leaves it is an "
        "export level (the frontier below); the audit store keeps scores and ids, and the service never "
        "returns fingerprints to callers.",
        "- Per-token expert choices leak far more than these per-request aggregates: published inversion "
        "attacks on MoE routing reconstruct most of a prompt's tokens from the sequence of selected "
        "experts, because each token's expert set is a strong hash of the token in its context. RouteScan "
        "keeps only per-(layer, expert) sums over the whole prefill, so token order and token identity are "
        "summed away. The collectors never store per-token selections: the router hook's buffer lives "
        "for one forward pass and is reduced to counts before anything is written (see "
        "routescan/telemetry/emulated.py and cupti_records.py); a trace schema field that could hold "
        "per-token order does not exist, and a test checks no trace carries prompt text.",
        "- What the aggregates still reveal (length; source and topic above chance) is the price of the "
        "signal: the detector needs the topic-level shift to work at all.",
        "- Identifiers are the operator's own channel. A trace carries a `trace_id`, a `model_id` and "
        "short labels, and the audit store keeps the id. The schemas hold them to what collectors emit "
        "(ids: at most 96 characters and 8 segments, at most 3 alphabetic words, long mixed segments "
        "only as hex; label keys: identifiers of up to 3 words; kernel names: C++ symbols, not prose), "
        "which refuses a sentence or base64url text pasted into an id. No pattern can stop an operator "
        "who encodes text on purpose (a hex id of 32 characters holds 16 bytes): whoever chooses request "
        "ids or label columns decides what they say, and RouteScan's guarantee covers what it derives "
        "from routing, not what an operator writes into an identifier.",
        "",
    ]
    return "\n".join(lines)


def figure(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = {k: v for k, v in results["word_recovery"].items() if isinstance(v, dict)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].barh(list(w), [m["f1"] for m in w.values()], color="tab:blue")
    axes[0].set_xlabel("content-word recovery, micro F1")
    axes[0].set_xlim(0, 1)
    pools = list(results["retrieval"])
    x = range(len(pools))
    r = results["retrieval"]
    for off, key, label in (
        (-0.2, "chance_top10", "chance"),
        (0.0, "learned_top10", "learned"),
        (0.2, "model_access_top10", "model access"),
    ):
        axes[1].bar([i + off for i in x], [r[p][key] for p in pools], width=0.2, label=label)
    axes[1].set_xticks(list(x), [f"pool {p}" for p in pools])
    axes[1].set_ylabel("top-10 retrieval")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


HAND_WRITTEN = "<!-- hand-written: kept by routescan invert and routescan frontier -->"


def kept_sections(path: Path) -> str:
    """What a rerun of ``routescan invert`` keeps of an existing report: its frontier section and
    everything from the hand-written marker on."""
    if not path.exists():
        return ""
    old = path.read_text(encoding="utf-8")
    mark = old.find(HAND_WRITTEN)
    start, end = old.find(FRONTIER_START), old.find(FRONTIER_END)
    kept = []
    if 0 <= start < end and not 0 <= mark < start:  # a frontier above the marker is kept on its own
        kept.append(old[start : end + len(FRONTIER_END)])
    if mark >= 0:
        kept.append(old[mark:].rstrip("\n"))
    return "".join(f"\n{part}\n" for part in kept)


FRONTIER_START = "<!-- frontier: written by routescan frontier; a rerun replaces this section -->"
FRONTIER_END = "<!-- /frontier -->"


def render_frontier(results: dict[str, Any], *, command: str, figure: str | None) -> str:
    """docs/privacy.md's frontier section: one row per export level, leakage beside detection."""
    goal = results["goal"]
    lines = [
        FRONTIER_START,
        "## The frontier: export levels, what leaks and what detection keeps",
        "",
        f"{results['attack_rows']} plain prompts attacked (75% attacker training, 25% held out); "
        f"{results['detection_rows']} requests for detection (LODO and wrapper folds, logistic regression "
        "on each level's records; the score level is read as the score). Every level is fitted on "
        "training rows only, and its attackers are trained on its own output and know its parameters. "
        "Written by:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Goal: content-word F1 ≤ {goal['word_f1']:.2f}, top-1 among 1,000 ≤ {goal['top1_1000']:.0%}, "
        f"LODO AUROC ≥ {goal['lodo_auroc']:.2f}, wrapper AUROC within {goal['wrapper_drop']:.2f} of full. "
        "Word F1 is the best of the linear, MLP and k-NN attackers; top-1 the better of the learned and "
        "the model-access (dictionary) attacker, ties broken at random.",
        "",
        "| level | values | ε | word F1 (frequent words) | top-1 @100 | top-1 @1000 | length MAE (mean) | "
        "source acc (majority) | domain acc (majority) | LODO AUROC | LODO TPR@1% | wrapper AUROC | "
        "wrapper TPR@1% | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        s, leak = row["summary"], row["leakage"]
        v = leak["revealed"]
        eps = leak["privacy"]["epsilon"]
        length = v.get("length", {})
        nan = float("nan")
        mae, mean_mae = length.get("mae_tokens", nan), length.get("baseline_mae_tokens", nan)
        met = [k for k, ok in row["goal"].items() if not ok]
        lines.append(
            f"| {row['name']} | {leak['dim']} | {'—' if eps is None else f'{eps:g}'} | "
            f"{s['word_f1']:.3f} ({s['frequent_words_f1']:.3f}) | {s['top1_100']:.3f} | "
            f"{s['top1_1000']:.4f} | {mae:.1f} ({mean_mae:.1f}) | "
            + " | ".join(
                f"{v[k]['accuracy']:.3f} ({v[k]['majority_baseline']:.3f})" if k in v else "—"
                for k in ("source", "harm_domain")
            )
            + f" | {s['lodo_auroc']:.3f} | {s['lodo_tpr1']:.3f} | {s['wrapper_auroc']:.3f} | "
            f"{s['wrapper_tpr1']:.3f} | {'met' if not met else 'misses ' + ', '.join(met)} |"
        )
    rec = results.get("recommended")
    floor = results.get("label_floor")
    if floor:
        lines += [
            "",
            f"The harm label alone, given to the same word attackers, reaches F1 {floor['word_f1']:.3f} "
            f"(frequent words {floor['frequent_words_f1']:.3f}): any level that tells harmful from "
            "benign gives away at least that much vocabulary.",
        ]
    lines += [
        "",
        f"The strongest level whose detection stays inside the goal, on these traces: **{rec}**."
        if rec
        else "No level keeps detection inside the goal.",
    ]
    if figure:
        lines += ["", f"![detection against leakage]({figure})"]
    lines += ["", FRONTIER_END]
    return "\n".join(lines)


def splice(document: str, section: str) -> str:
    """``document`` with its frontier section replaced by ``section`` (appended when it has none)."""
    start, end = document.find(FRONTIER_START), document.find(FRONTIER_END)
    if start < 0 or end < start:
        return document.rstrip("\n") + "\n\n" + section + "\n"
    return document[:start] + section + document[end + len(FRONTIER_END) :]


def frontier_figure(results: dict[str, Any], path: Path) -> Path:
    """Detection against leakage, one point per level: wrapper and LODO AUROC against the prompt's
    top-1 among 1,000, and wrapper AUROC against content-word F1; the goal's limits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goal, rows = results["goal"], results["rows"]
    full = rows[0]["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = (
        (axes[0], "top1_1000", "wrapper_auroc", "prompt top-1 among 1,000 (best attacker)", "wrapper AUROC"),
        (axes[1], "top1_1000", "lodo_auroc", "prompt top-1 among 1,000 (best attacker)", "LODO AUROC"),
        (axes[2], "word_f1", "wrapper_auroc", "content-word F1 (best attacker)", "wrapper AUROC"),
    )
    for ax, x, y, xlabel, ylabel in panels:
        for i, row in enumerate(rows):
            s = row["summary"]
            colour = {"full": "tab:red", "layers": "tab:purple", "harm": "tab:green"}.get(
                row["level"], "tab:blue"
            )
            ax.scatter(max(s[x], 1e-3), s[y], color=colour, s=28)
            ax.annotate(
                row["name"], (max(s[x], 1e-3), s[y]), fontsize=6.5, xytext=(4, 6 if i % 2 else -9),
                textcoords="offset points",
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.axvline(goal["top1_1000"], color="grey", linestyle="--", linewidth=0.8)
    axes[2].axvline(goal["word_f1"], color="grey", linestyle="--", linewidth=0.8)
    floor = results.get("label_floor")
    if floor:
        axes[2].axvline(floor["word_f1"], color="tab:orange", linestyle=":", linewidth=1.0)
        axes[2].annotate("harm label alone", (floor["word_f1"], axes[2].get_ylim()[0]), fontsize=7,
                         xytext=(3, 4), textcoords="offset points", color="tab:orange")  # fmt: skip
    for ax in (axes[0], axes[2]):
        ax.axhline(full["wrapper_auroc"] - goal["wrapper_drop"], color="grey", linestyle="--", linewidth=0.8)
    axes[1].axhline(goal["lodo_auroc"], color="grey", linestyle="--", linewidth=0.8)
    fig.suptitle("Export levels: detection kept against what the fair attacker recovers (goal: dashed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
