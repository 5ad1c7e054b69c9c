"""The bench's statistics: a median with its spread, and verdicts that noise cannot flip.

A bench time is measured in rounds (`fastbn.bench`, `fastbn.bench.torch_mode`):
each round gives one value, the median of that round's calls, and the rounds
are spread over the run's moments and, in the NumPy mode, over fresh arrays.
A ratio is taken round by round (the two times of one round come from the
same moments of the machine), so a ratio is a series of rounds too.

Of a series, the bench reports an `estimate`: its median and its spread, the
distribution-free confidence interval of that median. Between the k-th
smallest and the k-th largest of n round values lies the median of the
rounds' distribution with probability 1 - 2 P(Binomial(n, 1/2) < k), whatever
that distribution; k is the largest with at least `CONFIDENCE` (5 rounds:
the lowest and the highest, 94%; 10 rounds: the second of each end, 98%;
20 rounds: the sixth, 96%).

A verdict on a limit is MET (True) or NOT MET (False) only when the whole
interval is on one side of it, and `NOISE` when the interval holds the limit.
"""

import math
import statistics

CONFIDENCE = 0.9
NOISE = "noise"  # a verdict: the spread holds the limit, so the run cannot tell


def interval_rank(n, confidence=CONFIDENCE):
    """The k of the interval [k-th smallest, k-th largest] of n values (1: the range).

    The largest k whose interval holds the median with probability at least
    ``confidence``; 1 when even the range holds it with less (4 values or
    fewer at 0.9).
    """
    k = 1
    below = 1  # C(n, 0) + ... + C(n, k - 1) values fall below the k-th smallest
    while k < (n + 1) // 2:
        below_next = below + math.comb(n, k)
        if 1 - 2 * below_next / 2**n < confidence:
            break
        below = below_next
        k += 1
    return k


def estimate(values):
    """The median of a series of round values, with its interval.

    Returns
    -------
    dict
        "median", "low" and "high" (the interval, `interval_rank`), "n"
        (values).
    """
    s = sorted(values)
    n = len(s)
    k = interval_rank(n)
    return {"median": statistics.median(s), "low": s[k - 1], "high": s[n - k], "n": n}


def paired_ratios(numerators, denominators):
    """Round-by-round ratios of two series of the same rounds."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} rounds over {len(denominators)}: not paired")
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def geometric_mean_rounds(series):
    """The geometric mean over several series, round by round (the first rounds of each)."""
    n = min(len(s) for s in series)
    return [math.exp(sum(math.log(s[i]) for s in series) / len(series)) for i in range(n)]


def relative_spread(est):
    """The interval's width over the median."""
    return (est["high"] - est["low"]) / est["median"]


def half_width(est):
    """How far the interval reaches from the median, on its farther side."""
    return max(est["high"] - est["median"], est["median"] - est["low"])


def verdict(est, goal, limit):
    """MET (True), NOT MET (False) or `NOISE`: an estimate against a limit.

    ``goal`` is ">=", ">" or "<=", what the value must be against ``limit``.
    Decided only when the whole interval is on one side of the limit. The
    limit may be a band, a (low, high) pair: then MET needs the interval on
    the goal's side of the whole band and NOT MET on the other side of it
    (a value inside the band decides nothing).
    """
    bottom, top = limit if isinstance(limit, tuple) else (limit, limit)
    low, high = est["low"], est["high"]
    if goal == ">=":
        met, missed = low >= top, high < bottom
    elif goal == ">":
        met, missed = low > top, high <= bottom
    elif goal == "<=":
        met, missed = high <= bottom, low > top
    else:
        raise ValueError(f"goal must be '>=', '>' or '<=', got {goal!r}")
    return True if met else False if missed else NOISE


def every(verdicts):
    """A target on several parts: NOT MET if one is, MET if all are, else `NOISE`."""
    verdicts = list(verdicts)
    if False in verdicts:
        return False
    return True if all(v is True for v in verdicts) else NOISE
