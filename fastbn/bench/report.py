"""The bench's results: rows from the workers' timings, the targets, the printout, the plot.

The targets are the contract's (docs/guide/contract.md, Performance targets):
the page lists each target's text as `format_targets` prints it.

A row is one case, dtype and pass, measured in rounds (`fastbn.bench`): each
peer's time in each round, at the thread count whose median over the rounds
is lowest. Its ratios, each a `stats.estimate` of the round-by-round ratios
(median and interval):

- vs_numpy = numpy / fastbn and vs_torch = torch / fastbn, every peer
  allocating its outputs;
- vs_roofline = fastbn-out / roofline, where the roofline of a pass is the
  sum of its kernels' times (`ROOFLINE_OF_PASS`): R + RW for train forward,
  RW for eval, R2 + R2W for backward;
- out_vs_fastbn = fastbn-out / fastbn, the same calls into preallocated
  outputs: above 1 beyond the spread, the two columns disagree;
- gbps, fastbn-out's effective bandwidth: x, y, dy and dx counted once each
  (`ARRAYS_MOVED` times the data's bytes) over its median time.

A target is MET or NOT MET only when the spread of every row it rests on is
on one side of its limit, else WITHIN NOISE (`stats.verdict`).
"""

import glob
import os
import platform
import statistics
import subprocess
import sys

import fastbn
from fastbn.bench import stats
from fastbn.bench.cold import format_cold_start
from fastbn.bench.peers import ARRAYS_MOVED, LAYOUTS, PASSES, ROOFLINE_FORMS, ROOFLINE_OF_PASS
from fastbn.kernels import rows as rows_kernels

MiB = 1 << 20
# The contract's limits on fastbn-out / roofline for data over 8 MiB.
ROOFLINE_LIMITS = {"train": 1.15, "eval": 1.1, "backward": 1.15}
L2_ASSUMED = 256 * 1024  # when the machine does not say
BROKEN_BELOW = 0.9  # fastbn-out / floor under this means the floor is no floor
# A row whose ratio's interval is wider than this fraction of its median is measured again.
WIDE = 0.2
# The contract's limits on the small (64, 128) float32 calls, medians in microseconds.
SMALL_LIMITS_US = {
    "functional train forward": 5,
    "functional eval forward": 4,
    "functional backward": 6,
    "layer forward + backward": 12,
}


def round_series(records):
    """Each call's values at each thread count, in round order: call -> threads -> list.

    A record is one round's median of one call at one thread count; a
    record without a "round" is the only round.
    """
    series = {}
    for r in sorted(records, key=lambda r: r.get("round", 0)):
        series.setdefault(r["call"], {}).setdefault(r["threads"], []).append(r["median"])
    return series


def best_times(records):
    """Each call at its best thread count: the lowest median over the rounds.

    Returns
    -------
    dict
        call -> {"seconds" (the median), "threads", "rounds" (that thread
        count's value of each round), "by_threads": {threads: rounds}}.
    """
    best = {}
    for call, by_threads in round_series(records).items():
        medians = {n: statistics.median(values) for n, values in by_threads.items()}
        n = min(medians, key=medians.__getitem__)
        best[call] = {
            "seconds": medians[n],
            "threads": n,
            "rounds": by_threads[n],
            "by_threads": {str(t): values for t, values in by_threads.items()},
        }
    return best


def time_estimate(timed):
    """The estimate of a `best_times` entry (one timed once, without rounds, is one round)."""
    return stats.estimate(timed.get("rounds") or [timed["seconds"]])


def floors(roofline_times, kernels=tuple(ROOFLINE_FORMS)):
    """Each kernel's floor: the fastest of its forms (`ROOFLINE_FORMS`), and which."""
    result = {}
    for kernel in kernels:
        form = min(ROOFLINE_FORMS[kernel], key=lambda f: roofline_times[f]["seconds"])
        result[kernel] = {**roofline_times[form], "form": form}
    return result


def summed_rounds(series):
    """Round by round, the sum of several series of the same rounds."""
    return [sum(values) for values in zip(*series, strict=True)]


def ratio(numerator, denominator):
    """The estimate of the round-by-round ratio of two series of the same rounds."""
    return stats.estimate(stats.paired_ratios(numerator, denominator))


def case_rows(case, dtype, records):
    """The rows (one per pass) of one case and dtype from each peer's timing records.

    ``records`` maps each peer (the roofline's forms under "roofline") to
    its records, one per round, call and thread count; a roofline record's
    "pass" names the pass it was timed beside (none: every pass's).
    """
    roofline_records = records["roofline"]
    best = {peer: best_times(r) for peer, r in records.items() if peer != "roofline"}
    nbytes = case.nbytes(dtype)
    rows = []
    for p in PASSES:
        beside = [r for r in roofline_records if r.get("pass", p) == p]
        roofline = floors(best_times(beside), ROOFLINE_OF_PASS[p])
        rounds = {peer: b[p]["rounds"] for peer, b in best.items()}
        roof = summed_rounds(roofline[k]["rounds"] for k in ROOFLINE_OF_PASS[p])
        seconds = {peer: b[p]["seconds"] for peer, b in best.items()}
        rows.append(
            {
                "case": case.label,
                **case.to_json(),
                "dtype": dtype,
                "nbytes": nbytes,
                "pass": p,
                "seconds": seconds,
                "rounds": rounds,
                "threads": {peer: b[p]["threads"] for peer, b in best.items()},
                "by_threads": {peer: b[p]["by_threads"] for peer, b in best.items()},
                "roofline_kernels": roofline,
                "roofline": statistics.median(roof),
                "roofline_rounds": roof,
                "gbps": ARRAYS_MOVED[p] * nbytes / seconds["fastbn-out"] / 1e9,
                "vs_numpy": ratio(rounds["numpy"], rounds["fastbn"]),
                "vs_torch": ratio(rounds["torch"], rounds["fastbn"])
                if "torch" in rounds
                else None,
                "vs_roofline": ratio(rounds["fastbn-out"], roof),
                "out_vs_fastbn": ratio(rounds["fastbn-out"], rounds["fastbn"]),
            }
        )
    return rows


def disagreements(row):
    """What in a row contradicts itself beyond its spread: the reasons to measure it again.

    Returns
    -------
    dict
        reason -> the estimate that shows it: fastbn-out slower than fastbn
        (the same calls, into preallocated outputs), or the roofline slower
        than the pass it bounds.
    """
    reasons = {}
    if stats.verdict(row["out_vs_fastbn"], "<=", 1.0) is False:
        reasons["fastbn-out slower than fastbn"] = row["out_vs_fastbn"]
    if stats.verdict(row["vs_roofline"], ">=", 1.0) is False:
        reasons["roofline slower than fastbn-out"] = row["vs_roofline"]
    return reasons


def wide_ratios(row):
    """The names of a row's ratios whose interval is wider than `WIDE` of their median."""
    ratios = ("vs_numpy", "vs_torch", "vs_roofline")
    return [k for k in ratios if row[k] is not None and stats.relative_spread(row[k]) > WIDE]


# --- the machine --------------------------------------------------------------------


def cpu_model():
    """lscpu's model name, else platform.processor(), else "unknown"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def l2_bytes():
    """The L2 cache of one core in bytes, from Linux's sysfs; None if it does not say."""
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as f:
                level = f.read().strip()
            with open(f"{index}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "2":
            units = {"K": 1 << 10, "M": 1 << 20}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


def machine_info(workers, settings):
    """The machine, the versions and the threads, merged from the workers' answers."""
    info = {
        "fastbn": fastbn.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "l2_bytes": l2_bytes(),
        "max_threads": max(settings.threads),
    }
    for answer in workers.values():
        info.update(answer)
    return info


# --- the contract's targets ---------------------------------------------------------


def label(row):
    return f"{row['case']} {row['dtype']} {row['pass']}"


def in_mid_range(row):
    return MiB <= row["nbytes"] <= 8 * MiB


def is_large(row):
    return row["nbytes"] > 8 * MiB


def target(text, met, measured):
    return {"target": text, "met": met, "measured": measured}


def ranked_verdicts(rows, value, goal, limit):
    """A target's verdict on every row (`stats.every` of each row's `stats.verdict`), and
    the row it reports: the worst median among the rows whose verdict is the target's.

    ``limit`` is a number or a band (`stats.verdict`), or a function giving each row's own.
    """
    limit_of = limit if callable(limit) else lambda r: limit
    verdicts = [stats.verdict(value(r), goal, limit_of(r)) for r in rows]
    met = stats.every(verdicts)
    deciding = [r for r, v in zip(rows, verdicts, strict=True) if v == met]
    worst = (min if goal in (">=", ">") else max)(deciding, key=lambda r: value(r)["median"])
    return met, worst


def worst_row(text, rows, value, goal, limit):
    """A target on every chosen row: MET if every row's interval is on the limit's good side,
    NOT MET if one row's is wholly on the other, else WITHIN NOISE (`stats.NOISE`).

    ``value(row)`` is an estimate (`stats.estimate`) or None (not measured).
    """
    rows = [r for r in rows if value(r) is not None]
    if not rows:
        return target(f"{text} {goal} {limit}x", None, "not measured in this run")
    met, row = ranked_verdicts(rows, value, goal, limit)
    worst = "worst " if met != stats.NOISE else "undecided: "
    measured = f"{worst}{format_range(value(row))} ({label(row)})"
    return target(f"{text} {goal} {limit}x", met, measured)


def broken_floor(text, rows, value):
    """The target broken, if fastbn-out beats a row's floor by more than 10% beyond the
    spread (a floor that fastbn beats is no floor); else None."""
    broken = [r for r in rows if stats.verdict(value(r), ">=", BROKEN_BELOW) is False]
    if not broken:
        return None
    row = min(broken, key=lambda r: value(r)["median"])
    measured = f"fastbn-out at {format_range(value(row))} of its floor ({label(row)}): not a floor"
    return target(text, "broken", measured)


def may_be_broken(rows, value):
    """Rows whose interval holds `BROKEN_BELOW`: their floor may be no floor."""
    return [r for r in rows if stats.verdict(value(r), ">=", BROKEN_BELOW) == stats.NOISE]


def floor_row(text, rows, value, limit):
    """A roofline target: worst_row on ``<= limit``, unless a floor is broken (`broken_floor`);
    a row that may be broken (its interval holds 0.9) leaves the target WITHIN NOISE at best.
    """
    rows = [r for r in rows if value(r) is not None]
    found = worst_row(text, rows, value, "<=", limit)
    if rows:
        broken = broken_floor(found["target"], rows, value)
        if broken:
            return broken
        doubtful = may_be_broken(rows, value)
        if doubtful and found["met"] is True:
            row = doubtful[0]
            measured = f"fastbn-out at {format_range(value(row))} of its floor ({label(row)})"
            return target(found["target"], stats.NOISE, measured + ": broken within noise")
    return found


def vs_torch_rounds(row):
    return stats.paired_ratios(row["rounds"]["torch"], row["rounds"]["fastbn"])


def torch_geomean(rows):
    """The geometric mean of torch / fastbn over the table, round by round, against 1.5x."""
    rows = [r for r in rows if r["vs_torch"] is not None]
    text = "vs PyTorch, geometric mean over the table >= 1.5x"
    if not rows:
        return target(text, None, "not measured in this run")
    g = stats.estimate(stats.geometric_mean_rounds([vs_torch_rounds(r) for r in rows]))
    return target(text, stats.verdict(g, ">=", 1.5), f"{format_range(g)} over {len(rows)} rows")


def fastest_at(row, peer, threads):
    """Whether a peer's pass is fastest at ``threads``: against each other thread count,
    the round-by-round ratio of its time over the time at ``threads`` (`stats.verdict`)."""
    by_threads = row["by_threads"][peer]
    at = by_threads[str(threads)]
    return stats.every(
        stats.verdict(ratio(other, at), ">", 1.0)
        for t, other in by_threads.items()
        if t != str(threads)
    )


def few_features(rows, max_threads):
    """(2, 4194304) float32: fastest at every thread, and within the roofline limits."""
    text = f"(2, 4194304) float32: best at {max_threads} threads, within the roofline limits"
    rows = [r for r in rows if r["name"] == "2x4194304" and r["dtype"] == "float32"]
    if not rows:
        return target(text, None, "not measured in this run")

    def vs_roofline(r):
        return r["vs_roofline"]

    broken = broken_floor(text, rows, vs_roofline)
    if broken:
        return broken
    threads = sorted({r["threads"]["fastbn-out"] for r in rows})
    row = max(rows, key=lambda r: r["vs_roofline"]["median"] / ROOFLINE_LIMITS[r["pass"]])
    met = stats.every(
        [
            *(fastest_at(r, "fastbn-out", max_threads) for r in rows),
            *(stats.verdict(r["vs_roofline"], "<=", ROOFLINE_LIMITS[r["pass"]]) for r in rows),
            *(stats.NOISE for _ in may_be_broken(rows, vs_roofline)),
        ]
    )
    measured = (
        f"best at {'/'.join(map(str, threads))} threads; worst {format_range(row['vs_roofline'])}"
        f" of {ROOFLINE_LIMITS[row['pass']]}x ({label(row)})"
    )
    return target(text, met, measured)


def read_once(row, l2):
    """Whether training reads the row's data from memory once: features-first, each
    feature's values in L2, by the rows kernels' own rule (`rows.FEATURE_BYTES`,
    `rows.FEATURE_UNITS`): its statistics, then its output from cache. Then RW
    (R2W) is its floor, not R + RW; a longer row that would fit in a large L2 is
    still read twice.
    """
    n_features = row["shape"][0]
    feature_bytes = row["nbytes"] // n_features
    limit = min(l2, rows_kernels.FEATURE_BYTES)
    return (
        row["layout"] == "ff"
        and n_features >= rows_kernels.FEATURE_UNITS
        and feature_bytes <= limit
    )


def rows_in_l2(rows, l2):
    """Features-first rows over 8 MiB that training reads once (`read_once`)."""
    return [r for r in rows if is_large(r) and read_once(r, l2)]


def streamed_rows(rows, l2):
    """Rows over 8 MiB read from memory twice in training: all but `rows_in_l2`."""
    return [r for r in rows if is_large(r) and not read_once(r, l2)]


def floor_rounds(l2):
    """A row's floor, in seconds each round: R + RW (R2 + R2W), or RW (R2W) for rows read
    once."""
    once = {"train": "RW", "backward": "R2W"}

    def rounds(r):
        if r["pass"] in once and read_once(r, l2):
            return r["roofline_kernels"][once[r["pass"]]]["rounds"]
        return r["roofline_rounds"]

    return rounds


def floor_ratio(l2):
    """fastbn-out over its floor (`floor_rounds`): what the targets and the /roof column use."""
    floor = floor_rounds(l2)
    return lambda r: ratio(r["rounds"]["fastbn-out"], floor(r))


def kernel_ratio(kernel):
    return lambda r: ratio(r["rounds"]["fastbn-out"], r["roofline_kernels"][kernel]["rounds"])


def small_target(text, small, call, limit_us):
    est = time_estimate(small[call])
    return target(
        f"{text} <= {limit_us} us",
        stats.verdict(est, "<=", limit_us * 1e-6),
        f"{format_range(est, 1e6, ' us', 1)} median ({thread_text(small[call]['threads'])})",
    )


def cold_start_target(cold):
    """The warm-cache cold start against 1.0 s: over its runs' totals (one run: its total)."""
    warm = cold["warm_cache"]
    est = stats.estimate(warm.get("totals") or [warm["total"]])
    return target(
        "cold start, warm compile cache <= 1.0 s",
        stats.verdict(est, "<=", 1.0),
        f"{format_range(est, 1, ' s', 3)} (empty cache: {cold['empty_cache']['total']:.1f} s)",
    )


def evaluate_targets(results):
    """The contract's targets, each MET (True), NOT MET (False), `stats.NOISE` (the spread
    holds the limit), "broken" (a floor is no floor) or not measured (None)."""
    rows = results["rows"]
    l2 = results["machine"]["l2_bytes"] or L2_ASSUMED
    train_bwd = [r for r in rows if r["pass"] in ("train", "backward")]
    large = [r for r in rows if is_large(r)]
    mid = [r for r in rows if in_mid_range(r)]
    in_l2 = rows_in_l2(rows, l2)
    streamed = streamed_rows(rows, l2)
    once_kib = min(l2, rows_kernels.FEATURE_BYTES) // 1024

    def of_pass(chosen, p):
        return [r for r in chosen if r["pass"] == p]

    def vs_roofline(r):
        return r["vs_roofline"]

    return [
        worst_row(
            "vs NumPy, train fwd and bwd, 1-8 MiB",
            [r for r in train_bwd if in_mid_range(r)],
            lambda r: r["vs_numpy"],
            ">=",
            10,
        ),
        worst_row(
            "vs NumPy, train fwd and bwd, > 8 MiB",
            [r for r in train_bwd if is_large(r)],
            lambda r: r["vs_numpy"],
            ">=",
            6,
        ),
        worst_row("vs PyTorch, every row", rows, lambda r: r["vs_torch"], ">=", 1.0),
        torch_geomean(rows),
        floor_row("> 8 MiB, train / (R + RW)", of_pass(streamed, "train"), vs_roofline, 1.15),
        floor_row(
            "> 8 MiB, backward / (R2 + R2W)", of_pass(streamed, "backward"), vs_roofline, 1.15
        ),
        floor_row("> 8 MiB, eval / RW", of_pass(large, "eval"), vs_roofline, 1.1),
        floor_row(
            f"ff > 8 MiB, rows in L2 (<= {once_kib} KiB), train / RW",
            of_pass(in_l2, "train"),
            kernel_ratio("RW"),
            1.25,
        ),
        floor_row(
            f"ff > 8 MiB, rows in L2 (<= {once_kib} KiB), backward / R2W",
            of_pass(in_l2, "backward"),
            kernel_ratio("R2W"),
            1.25,
        ),
        floor_row(
            "1-8 MiB, train / (R + RW), RW where read once",
            of_pass(mid, "train"),
            floor_ratio(l2),
            2.0,
        ),
        floor_row(
            "1-8 MiB, backward / (R2 + R2W), R2W where read once",
            of_pass(mid, "backward"),
            floor_ratio(l2),
            2.0,
        ),
        few_features(rows, results["machine"]["max_threads"]),
        *(
            small_target(f"(64, 128) float32, {call}", results["small"], call, limit_us)
            for call, limit_us in SMALL_LIMITS_US.items()
        ),
        cold_start_target(results["cold_start"]),
    ]


# --- the printout -------------------------------------------------------------------


def format_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds:.3f}s"


def thread_text(n):
    return "1 thread" if n == 1 else f"{n} threads"


def format_ratio(est):
    """An estimate of a ratio as its median and the farther end of its interval: 1.22x±0.05."""
    if est is None:
        return "-"
    return f"{est['median']:.2f}x±{stats.half_width(est):.2f}"


def format_time_spread(est):
    """An estimate of a time as its median and its interval's farther end in %: 16.1us±4%."""
    if est is None:
        return "-"
    return f"{format_time(est['median'])}±{100 * stats.half_width(est) / est['median']:.0f}%"


def format_range(est, scale=1.0, unit="x", digits=2):
    """An estimate as its median and its interval: 0.97x (0.93-1.02)."""
    m, low, high = (scale * est[k] for k in ("median", "low", "high"))
    return f"{m:.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"


def format_header(results):
    m = results["machine"]
    s = results["settings"]
    l2 = f"L2 {m['l2_bytes'] // 1024} KiB per core" if m["l2_bytes"] else "L2 unknown"
    torch = (
        f", torch {m['torch']} ({m['torch_threads']} threads by default)"
        if "torch" in m
        else ", torch not installed"
    )
    threads = ", ".join(map(str, s["threads"]))
    return "\n".join(
        [
            f"fastbn {m['fastbn']} benchmark: all times are MEDIANS over {s['rounds']} rounds"
            f" (more for a row measured again) of each round's median of repeated calls"
            f" (one warm-up call, then >= {s['budget'] / s['rounds']:.3g} s and >= 1 call"
            " each, on arrays allocated afresh each round); ±: the farther end of the median's"
            f" {stats.CONFIDENCE:.0%} interval (times in %), ratios taken round by round",
            f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}, {l2}); python {m['python']},"
            f" numpy {m['numpy']}, numba {m['numba']} (threading layer {m['threading_layer']},"
            f" {m['numba_threads']} threads){torch}",
            f"threads: each peer at its best of {threads} (column thr: fastbn's/torch's);"
            f" each peer in a subprocess of its own (the roofline in fastbn-out's, on its"
            f" arrays), the peers of a case back to back in each round, in turn first;"
            f" run took {s['seconds']:.0f} s, load average {s['load_average'][0]:.2f} before,"
            f" {s['load_average'][1]:.2f} after (other processes widen the spreads)",
            "layouts: " + "; ".join(f"{k} = {v}" for k, v in LAYOUTS.items()),
            "  (torch gets ff data as the (1, n, m) view, nhwc as the channels_last"
            " (N, C, H, W) view, of the same memory)",
            "GB/s: fastbn-out's, x, y, dy, dx counted once each: train and eval move"
            " 2x the data's bytes, backward 3x (1 GB = 1e9 bytes)",
            "xNumPy = numpy / fastbn, xTorch = torch / fastbn (all allocating outputs);"
            " /roof = fastbn-out / roofline, the roofline being R + RW (train), RW (eval),"
            " R2 + R2W (backward); RW (train) and R2W (backward) for features-first rows"
            " read from memory once (each feature in L2), as the targets hold them",
        ]
    )


COLUMNS = (
    ("case", "<16"),
    ("dtype", "<7"),
    ("MiB", ">5"),
    ("pass", "<8"),
    ("fastbn", ">12"),
    ("fastbn-out", ">13"),
    ("numpy", ">13"),
    ("torch", ">13"),
    ("roofline", ">13"),
    ("GB/s", ">5"),
    ("xNumPy", ">11"),
    ("xTorch", ">10"),
    ("/roof", ">10"),
    ("thr", ">3"),
    ("rnd", ">3"),
)


def table_cells(row, floor=lambda r: r["roofline_rounds"]):
    """A row's cells; floor gives its floor's rounds (`floor_rounds`), the targets' one.

    fastbn-out's time is marked "!" where it stays slower than fastbn's
    beyond the spread after the row's measurements (`disagreements`).
    """
    rounds = row["rounds"]
    threads = row["threads"]
    out_mark = "!" if "fastbn-out slower than fastbn" in disagreements(row) else ""
    return (
        row["case"],
        row["dtype"],
        f"{row['nbytes'] / MiB:.2f}",
        row["pass"],
        format_time_spread(stats.estimate(rounds["fastbn"])),
        out_mark + format_time_spread(stats.estimate(rounds["fastbn-out"])),
        format_time_spread(stats.estimate(rounds["numpy"])),
        format_time_spread(stats.estimate(rounds["torch"]) if "torch" in rounds else None),
        format_time_spread(stats.estimate(floor(row))),
        f"{row['gbps']:.1f}",
        format_ratio(row["vs_numpy"]),
        format_ratio(row["vs_torch"]),
        format_ratio(ratio(rounds["fastbn-out"], floor(row))),
        f"{threads['fastbn']}/{threads.get('torch', '-')}",
        str(len(rounds["fastbn"])),
    )


def format_line(cells, columns=COLUMNS):
    return " ".join(f"{cell:{spec}}" for cell, (_, spec) in zip(cells, columns, strict=True))


def format_table(rows, columns=COLUMNS, cells=table_cells):
    """One line per row (``cells(row)`` under ``columns``), a blank line between cases."""
    head = format_line([name for name, _ in columns], columns)
    lines = [head, "-" * len(head)]
    for i, row in enumerate(rows):
        if i and (row["case"], row["dtype"]) != (rows[i - 1]["case"], rows[i - 1]["dtype"]):
            lines.append("")
        lines.append(format_line(cells(row), columns))
    return "\n".join(lines)


def format_small(small):
    return "\n".join(
        f"small (64, 128) float32, {call}: {format_time_spread(time_estimate(t))} median"
        f" ({thread_text(t['threads'])})"
        for call, t in small.items()
    )


def format_disagreements(rows):
    """A line per row whose columns contradict each other beyond the spread after all its
    rounds: what (fastbn-out / fastbn, fastbn-out / R + RW), and in how many rounds."""
    lines = [
        f"  {label(r)}, {len(r['rounds']['fastbn'])} rounds: "
        + "; ".join(f"{reason}, {format_range(est)}" for reason, est in disagreements(r).items())
        for r in rows
        if disagreements(r)
    ]
    if not lines:
        return "no row's columns disagree beyond the spread"
    return "\n".join(["rows whose columns disagree beyond the spread (! in the table):", *lines])


# The targets' heading: the page and section that state them.
TARGETS_HEADING = "Targets (docs/guide/contract.md, Performance targets):"


def format_targets(targets):
    status = {True: "MET", False: "NOT MET", None: "-", "broken": "BROKEN"}
    status[stats.NOISE] = "WITHIN NOISE"
    width = max(len(t["target"]) for t in targets)
    lines = [TARGETS_HEADING]
    for t in targets:
        lines.append(f"  {status[t['met']]:<12} {t['target']:<{width}}  {t['measured']}")
    return "\n".join(lines)


def format_report(results):
    floor = floor_rounds(results["machine"]["l2_bytes"] or L2_ASSUMED)
    return "\n\n".join(
        [
            format_header(results),
            format_table(results["rows"], cells=lambda row: table_cells(row, floor)),
            format_disagreements(results["rows"]),
            format_small(results["small"]),
            format_cold_start(results["cold_start"]),
            format_targets(results["targets"]),
        ]
    )


# --- the plot -----------------------------------------------------------------------


def plot(rows, path):
    """Effective GB/s against the data's bytes, one panel per pass, a series per peer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "--plot: matplotlib is not installed, so no plot was written (pip install matplotlib)",
            file=sys.stderr,
        )
        return
    peers = list(rows[0]["seconds"])
    fig, axes = plt.subplots(1, len(PASSES), figsize=(6 * len(PASSES), 4.5), sharey=True)
    for ax, p in zip(axes, PASSES, strict=True):
        pass_rows = sorted((r for r in rows if r["pass"] == p), key=lambda r: r["nbytes"])

        def gbps(row, seconds, p=p):
            return ARRAYS_MOVED[p] * row["nbytes"] / seconds / 1e9

        for peer in peers:
            sizes = [r["nbytes"] for r in pass_rows]
            ax.plot(sizes, [gbps(r, r["seconds"][peer]) for r in pass_rows], "o", label=peer)
        ax.plot(
            [r["nbytes"] for r in pass_rows],
            [gbps(r, r["roofline"]) for r in pass_rows],
            "k_",
            markersize=14,
            label="roofline",
        )
        ax.set_xscale("log")
        ax.set_title(f"{p} ({' + '.join(ROOFLINE_OF_PASS[p])})")
        ax.set_xlabel("data size (bytes)")
    axes[0].set_ylabel("effective GB/s (x, y, dy, dx once each)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}", file=sys.stderr)
