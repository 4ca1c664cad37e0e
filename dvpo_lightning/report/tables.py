"""The paper's tables for one study, as plain data (JSON) and markdown, mean ± the 95 %
Student-t interval's half-width over seeds (the report's one interval convention).

- :func:`quality_table` — Table 1 analog: held-out gold reward, win rate against the SFT
  policy under the gold judge, KL to the reference, response length; mean ± 95 % CI.
- :func:`paired_table` — one method against each other, seed by seed: the paired difference
  of the held-out gold reward and KL with its 95 % CI, its paired-t p-value raw and
  Holm-adjusted (:func:`adjust_p_values`), and on how many seeds it was ahead.
- :func:`eval_noise_table` — the final evaluation's own standard error (over its prompts)
  beside the spread between seeds.
- :func:`value_model_table` — Tables 3/4/5 analog: held-out pair accuracy of the GVM, the
  scalar RM and each PPO run's critic at its end, on in-distribution and on shifted pairs.
- :func:`cost_table` — Table 7 analog: seconds per RL step, generated tokens and peak memory
  per method, all measured in the same study, with ratios to a baseline method.
- :func:`convergence_table` — the RL step at which each method reaches 95 % of its best
  held-out gold reward (Figure 4's reading).
- :func:`refresh_table` — semi-online DVPO (and a refreshed reward model): labels bought, and
  the refreshed model's accuracy on each refresh's new samples before and after it.

Each table is ``{"title", "columns": [[key, label], …], "rows": {name: {key: cell}}}`` and
``interval``: what follows a mean's ``±`` (always ``ci95``, the half-width of the 95 %
Student-t interval over seeds). A cell is a :func:`~dvpo_lightning.report.runs.mean_std`
dict, a :func:`~dvpo_lightning.report.stats.paired_difference` dict (which also carries its
``p``), a ``{"text": …}`` dict, or None when it does not apply. ``DIGITS`` says how many
decimals a column is printed with (3 unless listed). Row names are method names as the
pipeline spells them (``dvpo@kl=0.03`` too): labels, never parsed.
"""

from __future__ import annotations

from dvpo_lightning.report.runs import Run, by_method, convergence_step, mean_std, update_scale
from dvpo_lightning.report.stats import holm, paired_difference, summarize

DIGITS = {"response_len": 2, "gen_tokens_per_step": 1, "params_loaded_m": 3,
          "params_trained_m": 3, "time_ratio": 2, "mem_ratio": 2, "step_best": 1,
          "step_gain": 1, "rl_steps": 0, "peak_rss_gb": 3, "peak_mem_gb": 2,
          "labels_used": 0, "refreshes": 0, "refresh_s": 2, "refresh_share": 3}
QUALITY_COLUMNS = [("gold_reward", "gold reward ↑"), ("win_rate_vs_sft", "win rate vs SFT ↑"),
                   ("kl_to_ref", "KL to ref"), ("response_len", "length")]


def quality_table(runs: list[Run], reference: str = "SFT") -> dict:
    """Final held-out evaluation per method; the first row is the starting policy, called
    ``reference`` (the SFT policy, or the instruct model: evaluated at each run's first
    validation). Only the labels change with ``reference``.

    The reference row is one value per *seed*: every method's run at a seed starts from the
    same policy and evaluates it, so those evaluations are averaged first and the interval is
    over seeds (pooling all runs would count one policy once per method).
    """
    rows = {f"{reference} (reference)": {
        "gold_reward": reference_per_seed(runs, "eval/gold_reward"), "win_rate_vs_sft": None,
        "kl_to_ref": reference_per_seed(runs, "eval/kl_to_ref"),
        "response_len": reference_per_seed(runs, "eval/response_len")}}
    for method, rs in by_method(runs).items():
        rows[method] = {
            "gold_reward": mean_std([r.final["eval/gold_reward"] for r in rs]),
            "win_rate_vs_sft": mean_std([r.final["eval/win_rate_vs_ref"] for r in rs]),
            "kl_to_ref": mean_std([r.final["eval/kl_to_ref"] for r in rs]),
            "response_len": mean_std([r.final["eval/response_len"] for r in rs])}
    columns = [(k, label.replace("SFT", reference)) for k, label in QUALITY_COLUMNS]
    return {"title": "Held-out quality at the end of RL (Table 1 analog)",
            "columns": columns, "rows": rows, "interval": "ci95"}


def reference_per_seed(runs: list[Run], key: str) -> dict:
    """:func:`mean_std` over seeds of the starting policy's evaluation ``key`` (each run's
    step-0 evaluation), averaging first the runs that share a seed (they evaluate the same
    policy); ``values`` holds one mean per seed, in seed order."""
    per_seed: dict[int, list[float]] = {}
    for r in runs:
        per_seed.setdefault(r.seed, []).append(r.reference[key])
    return mean_std([sum(v) / len(v) for _, v in sorted(per_seed.items())])


def paired_table(runs: list[Run], method: str = "dvpo") -> dict | None:
    """``method`` against every other method, seed by seed (None without ``method``'s runs).

    Per other method: the paired difference ``method − other`` of the final held-out gold
    reward and KL (mean, 95 % paired-t CI, two-sided paired-t p), and the seeds on which
    ``method`` had the higher gold reward. Seeds pair runs that share everything upstream of
    RL; a seed one side lacks is left out. The ``…_p`` / ``…_p_holm`` columns are filled by
    :func:`adjust_p_values` once the report's whole family of comparisons is known.
    """
    groups = by_method(runs)
    if method not in groups:
        return None

    def final(rs: list[Run], key: str) -> dict[int, float]:
        return {r.seed: r.final[key] for r in rs}

    rows = {}
    for other, rs in groups.items():
        if other == method:
            continue
        gold = paired_difference(final(groups[method], "eval/gold_reward"),
                                 final(rs, "eval/gold_reward"))
        if gold is None:
            continue
        rows[other] = {
            "gold_diff": gold,
            "ahead": {"text": f"{gold['wins']}/{gold['n']}"},
            "kl_diff": paired_difference(final(groups[method], "eval/kl_to_ref"),
                                         final(rs, "eval/kl_to_ref"))}
    return {"title": f"Paired differences over seeds: {method} − each method",
            "columns": [("gold_diff", f"gold reward, {method} − method"),
                        ("gold_diff_p", "p"), ("gold_diff_p_holm", "p (Holm)"),
                        ("ahead", f"seeds {method} ahead"),
                        ("kl_diff", f"KL, {method} − method"),
                        ("kl_diff_p", "p (KL)"), ("kl_diff_p_holm", "p (KL, Holm)")],
            "rows": rows, "interval": "ci95"}


def format_p(p: float | None) -> str:
    """A p-value as text: three decimals, ``<0.001`` below, ``—`` for no test."""
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def adjust_p_values(tables: dict[str, dict]) -> list[dict]:
    """Holm-adjust every paired comparison of a report together, in place.

    The family is every cell of every table that is a
    :func:`~dvpo_lightning.report.stats.paired_difference` (it carries ``p``) with a p-value:
    each gets ``p_holm`` (:func:`~dvpo_lightning.report.stats.holm` over the whole family),
    and its row gets the text cells ``<key>_p`` and ``<key>_p_holm`` its table's columns show.
    Returns the family: ``[{"table", "row", "column", "p", "p_holm"}]``.
    """
    family = [(name, row_name, key, cell)
              for name, table in tables.items() if table
              for row_name, row in table["rows"].items()
              for key, cell in list(row.items())
              if isinstance(cell, dict) and "p" in cell]
    adjusted = holm([cell["p"] for *_, cell in family])
    out = []
    for (name, row_name, key, cell), p_holm in zip(family, adjusted):
        cell["p_holm"] = p_holm
        row = tables[name]["rows"][row_name]
        row[f"{key}_p"], row[f"{key}_p_holm"] = {"text": format_p(cell["p"])}, \
            {"text": format_p(p_holm)}
        if cell["p"] is not None:
            out.append({"table": name, "row": row_name, "column": key, "p": cell["p"],
                        "p_holm": p_holm})
    return out


def prompt_means(items: list | None) -> list[float] | None:
    """One value per prompt: a prompt's own value, or the mean of its answers' values when it
    was answered several times (``rollout.eval_samples`` / ``test_samples`` above 1)."""
    if items is None:
        return None
    return [sum(v) / len(v) if isinstance(v, list) else v for v in items]


def eval_noise_table(runs: list[Run], key: str = "gold_reward") -> dict:
    """The final evaluation's own noise beside the spread between seeds, per method.

    A run's final ``key`` is a mean over N held-out prompts; with its per-prompt values
    (:attr:`Run.final_items`) its standard error is ``s / √N``, ``s`` the sample
    standard deviation over the prompts (of each prompt's mean over its answers, when it
    has several). Per method: N, that standard error averaged over the
    seeds, and the sample standard deviation of the final ``key`` between seeds. When the
    evaluation's noise is not small against the spread between seeds (or against a paired
    difference), one evaluation cannot resolve it. Runs whose summaries predate the
    per-prompt values (or lack ``key`` in them) leave the columns "not available".
    """
    rows = {}
    for method, rs in by_method(runs).items():
        items = [prompt_means(r.final_items.get(key)) for r in rs]
        finals = [r.final[f"eval/{key}"] for r in rs if f"eval/{key}" in r.final]
        spread = summarize(finals)["std"] if len(finals) > 1 else None
        row = {"seed_sd": {"text": f"{spread:.4f}"} if spread is not None else None}
        if all(v and len(v) > 1 for v in items):
            ses = [summarize(v)["std"] / len(v) ** 0.5 for v in items]
            se = sum(ses) / len(ses)
            ns = sorted({len(v) for v in items})
            row["n_items"] = {"text": "/".join(str(n) for n in ns)}
            row["eval_se"] = {"text": f"{se:.4f}", "values": ses}
            row["ratio"] = ({"text": f"{se / spread:.2f}"} if spread else None)
        else:
            row.update(n_items={"text": "not available"}, eval_se={"text": "not available"},
                       ratio=None)
        rows[method] = row
    return {"title": f"Evaluation noise: one evaluation's standard error against the spread "
                     f"between seeds ({key.replace('_', ' ')})",
            "columns": [("n_items", "held-out prompts N"),
                        ("eval_se", "eval. SE (sd over prompts / √N, mean over seeds)"),
                        ("seed_sd", "sd between seeds"), ("ratio", "eval. SE ÷ sd between seeds")],
            "rows": rows, "interval": "ci95"}


def value_model_table(models: dict[str, list[dict]],
                      shifted: dict[str, list[dict]] | None = None) -> dict:
    """Pair accuracy (``final`` value and token ``mean``) of each value model, over its runs.

    Args:
        models: row name → one :func:`~dvpo_lightning.report.value_accuracy.pair_accuracy`
            per seed on the in-distribution held-out pairs (``GVM``, ``ScalarRM``, the
            critic of each PPO run …).
        shifted: the same on the shifted held-out pairs (pairs of a behaviour policy no
            training data came from); None: no shifted columns.
    """
    def acc(accs: list[dict], key: str) -> dict:
        return mean_std([a["accuracy"][key] for a in accs])

    rows = {name: {"final": acc(accs, "final"), "mean": acc(accs, "mean")}
            for name, accs in models.items() if accs}
    columns = [("final", "acc. (final value) ↑"), ("mean", "acc. (token mean) ↑")]
    if shifted:
        for name, accs in shifted.items():
            if name in rows and accs:
                rows[name].update(shift_final=acc(accs, "final"), shift_mean=acc(accs, "mean"))
        columns += [("shift_final", "shifted: final ↑"), ("shift_mean", "shifted: token mean ↑")]
    return {"title": "Held-out pair accuracy of the value models, in distribution and shifted "
                     "(Tables 3/4/5 analog)", "columns": columns, "rows": rows,
            "interval": "ci95"}


REFRESH_COLUMNS = [("labels_used", "labels used"), ("refreshes", "refreshes"),
                   ("acc_before", "acc. before ↑"), ("acc_after", "acc. after ↑"),
                   ("acc_bought", "after − before"), ("refresh_s", "s / refresh"),
                   ("refresh_share", "share of training time")]


def _rounds(summary: dict) -> tuple[dict, str, str, str | None] | None:
    """A run's label rounds: ``(their summary, log prefix, the "before" accuracy's key, the
    "after" one's or None)``: a refresh of a frozen model (``refresh``), or online DPO's
    rounds (``online``: the policy's implicit-reward accuracy on the new pairs before it
    trains on them); None for a run that bought no labels."""
    if summary.get("refresh"):
        return (summary["refresh"], "refresh", "refresh/pair_acc_before",
                "refresh/pair_acc_after")
    if summary.get("online"):
        return summary["online"], "online", "online/reward_acc_before", None
    return None


def refresh_table(runs: list[Run], against: dict[str, str] | None = None) -> dict | None:
    """The label rounds of each method whose runs bought labels during training: a refreshed
    frozen model (semi-online DVPO's GVM, PPO's reward model: their summary's ``refresh``) or
    online DPO's pairs (``online``): labels bought, rounds, the model's pair accuracy on each
    round's newly labelled samples before (the drift it corrects) and after a refresh (what it
    bought), averaged over a run's rounds, and the rounds' seconds. ``against``: ``{method:
    the same method without new labels}``; each such row also gets the paired difference of
    the held-out gold reward, with − without (its p joins the report's Holm family). None when
    no run bought labels."""
    rows, groups = {}, by_method(runs)
    for method, rs in groups.items():
        found = [_rounds(r.summary) for r in rs]
        if not all(found):
            continue
        hs, prefix, before_key, after_key = [f[0] for f in found], *found[0][1:]

        def per_run(key: str | None) -> list[float]:
            out = []
            for x in hs if key else []:
                vals = [h[key] for h in x["history"] if h[key] == h[key]]
                if vals:
                    out.append(sum(vals) / len(vals))
            return out

        before, after = per_run(before_key), per_run(after_key)
        seconds = [sum(h[f"{prefix}/seconds"] for h in x["history"]) for x in hs]
        train = [r.summary.get("cost", {}).get("train_s") for r in rs]
        rows[method] = {
            "labels_used": mean_std([x["labels_used"] for x in hs]),
            "refreshes": mean_std([x["refreshes"] for x in hs]),
            "acc_before": mean_std(before), "acc_after": mean_std(after) if after else None,
            "acc_bought": mean_std([a - b for a, b in zip(after, before)])
            if after and len(after) == len(before) else None,
            "refresh_s": mean_std(per_run(f"{prefix}/seconds")),
            "refresh_share": mean_std([s / t for s, t in zip(seconds, train) if t])
            if all(train) else None}
        frozen = (against or {}).get(method)
        if frozen in groups:
            rows[method]["gold_vs_frozen"] = paired_difference(
                {r.seed: r.final["eval/gold_reward"] for r in rs},
                {r.seed: r.final["eval/gold_reward"] for r in groups[frozen]})
            rows[method]["frozen"] = {"text": frozen}
    if not rows:
        return None
    columns = list(REFRESH_COLUMNS)
    if any("gold_vs_frozen" in row for row in rows.values()):
        columns += [("frozen", "without new labels"), ("gold_vs_frozen", "gold, with − without"),
                    ("gold_vs_frozen_p", "p"), ("gold_vs_frozen_p_holm", "p (Holm)")]
    return {"title": "New labels during training: the GVM refreshed (semi-online DVPO), the "
                     "reward model refreshed (PPO), the policy's own pairs (online DPO)",
            "columns": columns,
            "rows": rows, "interval": "ci95"}


def cost_table(runs: list[Run], baseline: str | None = "ppo") -> dict:
    """Cost per method: the whole run's training time (equal policy updates), a step's
    seconds and their parts, and the ratios to ``baseline`` (same study, same machine).
    Memory is the CUDA peak on a GPU, else the process's peak RSS. A method that generates
    nothing while training (DPO) shows — for the rollout columns."""
    groups = by_method(runs)
    mem_key = ("peak_mem_gb" if all("peak_mem_gb" in r.summary["cost"] for r in runs)
               else "peak_rss_gb")
    rows = {}
    for method, rs in groups.items():
        c = [r.summary["cost"] for r in rs]
        rows[method] = {k: mean_std([x[k] for x in c]) for k in
                        ("step_s", "generate_s", "score_s", "update_s", "gen_tokens_per_step",
                         mem_key, "params_loaded_m", "params_trained_m")}
        # the whole run's training time: the comparison at equal policy updates (a DPO step is
        # one update, an RL step a rollout and several); older summaries: steps × mean
        rows[method]["train_s"] = mean_std([x.get("train_s", x["step_s"] * x["rl_steps"])
                                            for x in c])
        if all(x["gen_tokens_per_step"] == 0 for x in c):  # DPO: nothing generated to train
            for key in ("generate_s", "score_s", "update_s", "gen_tokens_per_step"):
                rows[method][key] = None
    if baseline in rows:
        b = rows[baseline]
        for row in rows.values():
            for key, ratio in (("train_s", "time_ratio"), (mem_key, "mem_ratio")):
                row[ratio] = mean_std([row[key]["mean"] / b[key]["mean"]])
    mem_label = "peak GPU mem (GB)" if mem_key == "peak_mem_gb" else "peak RSS (GB)"
    columns = [("train_s", "train s (whole run)"), ("step_s", "s / step"),
               ("generate_s", "generate s"),
               ("score_s", "score s"), ("update_s", "update s"),
               ("gen_tokens_per_step", "gen. tokens / step"), (mem_key, mem_label),
               ("params_loaded_m", "params loaded (M)"),
               ("params_trained_m", "params trained (M)")]
    if baseline in rows:
        columns += [("time_ratio", f"train time ÷ {baseline}"),
                    ("mem_ratio", f"mem ÷ {baseline}")]
    return {"title": "Cost per run and per step, same study and machine (Table 7 analog)",
            "columns": columns, "rows": rows, "interval": "ci95"}


def convergence_table(runs: list[Run], fraction: float = 0.95, reference: str = "SFT") -> dict:
    """Per method: best held-out gold reward, and the first RL step reaching ``fraction`` of
    it (of the reward, and of the gain over the SFT policy; runs that never beat it are left
    out of the second)."""
    rows = {}
    scale = update_scale(runs)  # in policy updates when every run records them (DPO: yes)
    unit = "policy updates" if scale else "RL steps"
    for method, rs in by_method(runs).items():
        k = scale[method] if scale else 1.0
        gains = [convergence_step(r.history, fraction, of_gain=True) for r in rs]
        gains = [g for g in gains if g is not None]
        rows[method] = {
            "best_gold": mean_std([max(h["eval/gold_reward"] for h in r.history) for r in rs]),
            "step_best": mean_std([k * convergence_step(r.history, fraction) for r in rs]),
            "step_gain": mean_std([k * g for g in gains]) if gains else None,
            "rl_steps": mean_std([k * r.summary["rl_steps"] for r in rs])}
    pct = f"{fraction:.0%}"
    return {"title": f"Convergence: {unit} to {pct} of the best held-out gold reward",
            "columns": [("best_gold", "best gold reward"),
                        ("step_best", f"{unit} to {pct} of best"),
                        ("step_gain", f"{unit} to {pct} of best gain over {reference}"),
                        ("rl_steps", unit)],
            "rows": rows, "interval": "ci95"}


def format_cell(cell: dict | None, digits: int = 3, interval: str = "ci95") -> str:
    """``mean ± ci95`` (``interval``: the key after ``±``; just the mean for one value); the
    text of a ``{"text": …}`` cell; ``—`` for None."""
    if cell is None:
        return "—"
    if "text" in cell:
        return cell["text"]
    spread = cell.get(interval)
    if cell["n"] == 1 or spread is None:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {spread:.{digits}f}"


def to_markdown(table: dict, note: str = "") -> str:
    """A markdown section: ``### title``, the table, then ``note``."""
    cols = table["columns"]
    interval = table.get("interval", "ci95")
    lines = [f"### {table['title']}", "", "| | " + " | ".join(label for _, label in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, row in table["rows"].items():
        lines.append(f"| {name} | " + " | ".join(
            format_cell(row.get(k), DIGITS.get(k, 3), interval) for k, _ in cols) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"
