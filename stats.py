"""
Small statistics: the means of per-item metrics over a data set (train.py's evaluation, the tasks' metrics), and
for reporting runs over seeds the mean, sample standard deviation and 95% confidence interval of the mean (Student
t; ab.py's tables, plots.py's sweep plot). Depends on nothing in this project.

Nothing to run on its own; `python -m pytest -q test_all.py -k "summarize or words"` tests it.
"""

import math


def nan_mean(values):
    """Mean of the values that are not NaN (NaN if none is): exact is NaN for a maze without a unique path."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


PER_WORD = ("uas", "las")  # parsing's attachment scores: means over all words (CoNLL), not over sentences


def item_means(items):
    """Each metric's mean over its items (a list per metric), NaN values left out. Where the items carry a "words"
    list (a parse: the words of each sentence), the metrics in PER_WORD are weighted by it."""
    words = items.get("words")
    return {k: sum(a * n for a, n in zip(v, words)) / sum(words) if words and k in PER_WORD else nan_mean(v)
            for k, v in items.items() if k != "words"}


# Two-sided 95% critical values of Student's t by degrees of freedom; between rows the smaller df is used,
# which overstates the interval a little rather than understating it.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}

def t_critical(df):
    """95% two-sided Student t critical value for df >= 1 degrees of freedom (1.96 beyond the table)."""
    if df > 120:
        return 1.960
    return T95[max(k for k in T95 if k <= df)]


def summarize(values):
    """(mean, sample std with n - 1, half-width of the 95% CI of the mean); std and CI are nan for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t_critical(n - 1) * std / math.sqrt(n)


def fmt(mean, std, ci):
    """'0.5123 ± 0.0100 (CI ±0.0248)'; a single run shows its value only."""
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f} (CI ±{ci:.4f})"
