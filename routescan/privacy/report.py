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
        "fingerprints as sensitive metadata: they stay inside the operator's trust boundary (the audit "
        "store keeps scores and ids, and the service never returns fingerprints to callers).",
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
