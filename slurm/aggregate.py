"""The paper's tables from finished runs, as Markdown, CSV and LaTeX, plus the weight-curve figure of each task.

    python slurm/aggregate.py                            # reads runs/, writes runs/tables/
    python slurm/aggregate.py --runs /scratch/runs --out paper_tables

Reads what slurm/launch.py's jobs write: runs/<name>/eval.json (benchmark scores of the trained network),
runs/<name>/history.json (weights per stage, format success counts), runs/<task>_pretrained/eval.json (the
"Pre-trained" rows) and runs/gt_<set>.json (the "GT (Ref.)" rows). Several seeds of one experiment, run directories
<name>_seed<k>, show as mean ± std. The best value of every column is bold (lower or higher by pyiqa's
`lower_better`; GT rows are references, not candidates). Missing runs show as "—" and are listed after the tables.
Writes <out>/table<k>.{md,csv,tex}, <out>/tables.md (all of them) and <out>/figure4_<task>.png.

    python slurm/aggregate.py --study controllers        # reads runs/controllers/, writes runs/tables/controllers*

The controller study (slurm/launch.py --study controllers): per objective, each controller's held-out test objective
and final feedback objective (mean ± std over seeds), a comparison with fixed weights paired by seed, and the
objective on the feedback images against the stage. Writes <out>/controllers_<objective>.{md,csv},
<out>/controllers.md, <out>/controllers.json (every number per run) and <out>/controllers_curves.png.
"""
import argparse
import csv
import functools
import importlib.util
import json
import re
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lossagent  # noqa: E402  (the repository root is on the path only now)
from tools.configurator import tomllib  # noqa: E402

# Benchmark columns per task, as the labels `lossagent.py eval` writes into eval.json.
SETS = {
    "cisr": ["Set5", "Set14", "BSD100", "Urban100", "Manga109"],
    "risr": ["OST300", "RealSRSet"],
    "air": ["SOTS", "Rain100L", "BSD68_sigma15", "BSD68_sigma25", "BSD68_sigma50"],
}
AVERAGE = {"cisr": True, "risr": False, "air": True}  # an "Avg" column (the mean of the set columns)
COLUMN_NAMES = {"BSD68_sigma15": "BSD68 σ=15", "BSD68_sigma25": "BSD68 σ=25", "BSD68_sigma50": "BSD68 σ=50"}
METRIC_NAMES = {"psnr": "PSNR", "ssim": "SSIM", "niqe": "NIQE", "maniqa": "MANIQA", "clipiqa": "CLIPIQA",
                "qalign": "Q-Align", "lpips": "LPIPS", "musiq": "MUSIQ"}
DECIMALS = {"psnr": 2, "ssim": 4, "niqe": 3, "maniqa": 4, "clipiqa": 4, "qalign": 3, "lpips": 4, "musiq": 2}
NO_REFERENCE = ["niqe", "maniqa", "clipiqa", "qalign"]  # the objectives of the paper
GT = "gt"  # a row source: runs/gt_<set>.json per column


def objective_blocks(task, fidelity):
    """Tables 2-4: per no-reference metric, the run optimised for it against the references; then the fidelity
    of every LossAgent run."""
    gt = [] if task == "risr" else [("GT (Ref.)", GT)]  # real-world inputs have no ground truth
    references = [("Pre-trained", f"{task}_pretrained"), ("Baseline", f"{task}_baseline")]
    blocks = [(m, [*references, (f"LossAgent ({METRIC_NAMES[m]})", f"{task}_{m}"), *gt]) for m in NO_REFERENCE]
    blocks += [(m, [*references, *[(f"LossAgent ({METRIC_NAMES[o]})", f"{task}_{o}") for o in NO_REFERENCE]])
               for m in fidelity]
    return blocks


def pair_blocks(metrics, rows):
    return [(m, rows) for m in metrics]


# Each table: number, title, task (its columns) and blocks (metric, [(row label, run name or GT)]); Table 9 lists
# runs and their format success rates instead.
TABLES = [
    dict(number=2, task="cisr", title="Classical SR x4 (SwinIR-M): no-reference objectives",
         blocks=objective_blocks("cisr", ["psnr", "ssim"])),
    dict(number=3, task="risr", title="Real-world SR x4 (SwinIR-M GAN): no-reference objectives",
         blocks=objective_blocks("risr", [])),
    dict(number=4, task="air", title="All-in-one restoration (PromptIR): no-reference objectives",
         blocks=objective_blocks("air", ["psnr", "ssim"])),
    dict(number=5, task="cisr", title="Q-Align alone and Q-Align with PSNR as objectives (classical SR x4)",
         blocks=pair_blocks(["qalign", "psnr", "ssim"], [
             ("Pre-trained", "cisr_pretrained"), ("Baseline", "cisr_baseline"),
             ("LossAgent (Q-Align)", "cisr_qalign"), ("LossAgent (Q-Align + PSNR)", "cisr_qalign_psnr")])),
    dict(number=6, task="air", title="A text objective: Co-Instruct descriptions, evaluated by Q-Align (AIR)",
         blocks=[("qalign", [("Pre-trained", "air_pretrained"), ("Baseline", "air_baseline"),
                             ("LossAgent (Q-Align)", "air_qalign"), ("LossAgent (Co-Instruct)", "air_coinstruct"),
                             ("GT (Ref.)", GT)]),
                 ("psnr", [("Pre-trained", "air_pretrained"), ("Baseline", "air_baseline"),
                           ("LossAgent (Q-Align)", "air_qalign"), ("LossAgent (Co-Instruct)", "air_coinstruct")])]),
    dict(number=7, task="cisr", title="System prompt without the direction sentence (NIQE objective)",
         blocks=pair_blocks(["niqe", "psnr"], [
             ("Baseline", "cisr_baseline"), ("LossAgent (full prompt)", "cisr_niqe"),
             ("LossAgent (no direction sentence)", "cisr_niqe_nodirection")])),
    dict(number=8, task="cisr", title="History prompt: all stages or the last two (MANIQA objective)",
         blocks=pair_blocks(["maniqa", "psnr"], [
             ("Baseline", "cisr_baseline"), ("LossAgent (full history)", "cisr_maniqa"),
             ("LossAgent (last two stages)", "cisr_maniqa_last2")])),
    dict(number=9, title="Format success rate of the agent's replies over the whole run",
         runs=["cisr_niqe", "cisr_niqe_noexample", "cisr_maniqa", "cisr_clipiqa", "cisr_qalign", "cisr_qalign_psnr",
               "cisr_niqe_nodirection", "cisr_maniqa_last2", "cisr_qalign_stage2500", "cisr_qalign_stage10000",
               "cisr_clipiqa_div2k", "risr_niqe", "risr_maniqa", "risr_clipiqa", "risr_qalign",
               "air_niqe", "air_maniqa", "air_clipiqa", "air_qalign", "air_coinstruct"]),
    dict(number=10, task="cisr", title="Stage length K, same 50k iterations in total (Q-Align objective)",
         blocks=pair_blocks(["qalign", "psnr"], [
             ("Baseline", "cisr_baseline"), ("LossAgent, K = 2500 (N = 20)", "cisr_qalign_stage2500"),
             ("LossAgent, K = 5000 (N = 10)", "cisr_qalign"),
             ("LossAgent, K = 10000 (N = 5)", "cisr_qalign_stage10000")])),
    dict(number=11, task="cisr", title="Feedback images from Set14 or from DIV2K (CLIPIQA objective)",
         blocks=pair_blocks(["clipiqa", "psnr"], [
             ("Baseline", "cisr_baseline"), ("LossAgent (Set14 feedback)", "cisr_clipiqa"),
             ("LossAgent (DIV2K feedback)", "cisr_clipiqa_div2k")])),
]
# Figure 4: the weight curves of the runs optimised for each no-reference objective.
FIGURE_RUNS = {task: [f"{task}_{m}" for m in NO_REFERENCE] for task in SETS}


@functools.cache
def pyiqa_configs():
    """pyiqa's table of metrics (DEFAULT_CONFIGS), read from its own file: that file needs only the standard
    library, while importing the pyiqa package loads torch and every model (10 s and more)."""
    spec = importlib.util.find_spec("pyiqa")
    if spec is None:
        return {}
    path = Path(spec.submodule_search_locations[0]) / "default_model_configs.py"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("pyiqa_default_configs", path))
    module.__spec__.loader.exec_module(module)
    return module.DEFAULT_CONFIGS


def lower_better(metric):
    """pyiqa's direction of a metric (PSNR and SSIM: higher is better)."""
    configs = pyiqa_configs()
    if metric in configs:
        return bool(configs[metric].get("lower_better", False))
    return metric in ("niqe", "lpips", "brisque", "pi", "dists")  # without pyiqa: the usual ones


def run_dirs(runs, name):
    """The run directory of `name` and those of its seeds (<name>_seed<k>), in seed order."""
    seeds = sorted((p for p in runs.glob(f"{name}_seed*") if re.fullmatch(rf"{re.escape(name)}_seed\d+", p.name)),
                   key=lambda p: int(p.name.rsplit("seed", 1)[1]))
    return [p for p in [runs / name, *seeds] if p.is_dir()]


def read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None


class Results:
    """Reads the run folders once, and remembers what was missing."""

    def __init__(self, runs):
        self.runs, self.missing = Path(runs), {}  # name -> the files that were not there

    def values(self, source, metric, sets):
        """Per seed: {set: value} for one row of a table (None where a set lacks the metric); [] if missing."""
        if source == GT:
            out = {}
            for s in sets:
                base = s.split("_sigma")[0]  # the denoising columns share their clean images
                doc = read_json(self.runs / f"gt_{base}.json")
                if doc is None:
                    self.missing.setdefault(f"gt_{base}", set()).add(str(self.runs / f"gt_{base}.json"))
                out[s] = (doc or {}).get("metrics", {}).get(metric, {}).get("mean")
            return [out] if any(v is not None for v in out.values()) else []
        seeds = []
        for d in run_dirs(self.runs, source):
            doc = read_json(d / "eval.json")
            if doc is not None:
                scores = {s: doc["datasets"].get(s, {}).get("metrics", {}) for s in sets}
                seeds.append({s: scores[s].get(metric, {}).get("mean") for s in sets})
        if not seeds:
            self.missing.setdefault(source, set()).add(str(self.runs / source / "eval.json"))
        return seeds

    def histories(self, name):
        out = []
        for d in run_dirs(self.runs, name):
            history = read_json(d / "history.json")
            if history is not None:
                config = tomllib.loads((d / "config.toml").read_text()) if (d / "config.toml").is_file() else {}
                out.append((history, config))
        if not out:
            self.missing.setdefault(name, set()).add(str(self.runs / name / "history.json"))
        return out


def mean_std(values):
    """(mean, std or None) over seeds; None if no seed has a value."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def cell_text(stat, metric):
    if stat is None:
        return "—"
    mean, std = stat
    d = DECIMALS.get(metric, 4)
    return f"{mean:.{d}f}" if std is None else f"{mean:.{d}f} ± {std:.{d}f}"


def metric_table(table, results):
    """Rows of one metric table: (metric label, row label, [cell text], [bold flags]); columns are the task's sets
    (and Avg). Averages are taken per seed, then over seeds."""
    sets = SETS[table["task"]]
    columns = sets + (["Avg"] if AVERAGE[table["task"]] else [])
    rows = []
    for metric, block in table["blocks"]:
        stats = []
        for _, source in block:
            seeds = results.values(source, metric, sets)
            for seed in seeds:
                present = [seed[s] for s in sets]
                seed["Avg"] = statistics.fmean(present) if None not in present else None
            stats.append([mean_std([seed[c] for seed in seeds]) for c in columns])
        best = []
        for c in range(len(columns)):
            candidates = [s[c][0] for (_, source), s in zip(block, stats) if source != GT and s[c] is not None]
            best.append((min if lower_better(metric) else max)(candidates) if candidates else None)
        arrow = "↓" if lower_better(metric) else "↑"
        for i, ((label, source), s) in enumerate(zip(block, stats)):
            bold = [source != GT and s[c] is not None and s[c][0] == best[c] for c in range(len(columns))]
            metric_label = f"{METRIC_NAMES.get(metric, metric)} {arrow}" if i == 0 else ""
            rows.append((metric_label, label, [cell_text(x, metric) for x in s], bold))
    return ["Metric", "Method", *[COLUMN_NAMES.get(c, c) for c in columns]], rows


def format_table(table, results):
    """Table 9: per run, the format example setting and 'rate (ok/total)' summed over stages and seeds."""
    rows, total_ok, total = [], 0, 0
    for name in table["runs"]:
        runs = results.histories(name)
        ok, asked = sum(h["parse_ok"] for h, _ in runs), sum(h["parse_total"] for h, _ in runs)
        example = {c.get("agent", {}).get("format_example") for _, c in runs} - {None}
        shown = "—" if not example else "yes" if example == {True} else "no" if example == {False} else "mixed"
        rate = f"{100 * ok / asked:.2f}% ({ok}/{asked})" if asked else "—"
        rows.append(("", name, [shown, rate], [False, False]))
        if example == {True}:
            total_ok, total = total_ok + ok, total + asked
    if total:
        rate = f"{100 * total_ok / total:.2f}% ({total_ok}/{total})"
        rows.append(("", "All runs with the format example", ["yes", rate], [False, False]))
    return ["", "Run", "Format example", "Success rate"], rows


def write_table(table, header, rows, out):
    """table<k>.md, .csv and .tex; returns the Markdown."""
    number, title = table["number"], table["title"]
    md = [f"## Table {number}. {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, label, cells, bold in rows:
        shown = [f"**{c}**" if b else c for c, b in zip(cells, bold)]
        md.append("| " + " | ".join([metric, label, *shown]) + " |")
    text = "\n".join(md) + "\n"
    (out / f"table{number}.md").write_text(text)
    with open(out / f"table{number}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([metric, label, *cells] for metric, label, cells, _ in rows)

    def tex(s):
        return s.replace("±", "$\\pm$").replace("—", "--").replace("%", "\\%").replace("↓", "$\\downarrow$") \
            .replace("↑", "$\\uparrow$").replace("σ", "$\\sigma$").replace("_", "\\_")
    lines = ["\\begin{table}", f"\\caption{{{tex(title)}}}", "\\begin{tabular}{ll" + "c" * (len(header) - 2) + "}",
             "\\hline", " & ".join(tex(h) for h in header) + " \\\\", "\\hline"]
    for metric, label, cells, bold in rows:
        shown = [f"\\textbf{{{tex(c)}}}" if b else tex(c) for c, b in zip(cells, bold)]
        lines.append(" & ".join([tex(metric), tex(label), *shown]) + " \\\\")
    lines += ["\\hline", "\\end{tabular}", "\\end{table}", ""]
    (out / f"table{number}.tex").write_text("\n".join(lines))
    return text


def weight_figure(task, results, path):
    """Figure 4: the loss weights per stage of each objective's run (the first seed), one panel per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    found = []
    for name in FIGURE_RUNS[task]:
        dirs = [d for d in run_dirs(results.runs, name) if (d / "history.json").is_file()]
        if dirs:
            found.append((name, json.loads((dirs[0] / "history.json").read_text())))
    if not found:
        return False
    fig, axes = plt.subplots(1, len(found), figsize=(4.5 * len(found), 3.5), squeeze=False)
    for ax, (name, history) in zip(axes[0], found):
        stages = [s["stage"] for s in history["stages"]]
        for loss in history["names"]:
            ax.plot(stages, [s["weights"][loss] for s in history["stages"]], marker="o", label=loss)
        ax.set(title=name, xlabel="stage", ylabel="weight", yscale="symlog")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def aggregate(runs, out):
    """Writes every table and figure; returns {table number: Markdown} and the missing runs {name: {files}}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(runs)
    texts = {}
    for table in TABLES:
        header, rows = format_table(table, results) if "runs" in table else metric_table(table, results)
        texts[table["number"]] = write_table(table, header, rows, out)
    figures = [task for task in SETS if weight_figure(task, results, out / f"figure4_{task}.png")]
    missing = [f"- {name}: no {', '.join(sorted(files))}" for name, files in sorted(results.missing.items())]
    summary = "\n".join(texts.values())
    summary += "\n" + ("## Missing runs\n\n" + "\n".join(missing) if missing else "All runs were found.") + "\n"
    summary += "".join(f"\n![Figure 4, {task}](figure4_{task}.png)\n" for task in figures)
    (out / "tables.md").write_text(summary)
    return texts, results.missing


# -----------------------------------------------------------------------------
# The controller study.

OBJECTIVES = {"niqe": "NIQE", "psnr": "PSNR", "fused": "NIQE + PSNR fused"}
STUDY_CONTROLLERS = ["llm", "optuna-tpe", "optuna-cmaes", "hillclimb", "random", "fixed", "l1-only", "perceptual-heavy"]
STATIC = ("fixed", "l1-only", "perceptual-heavy")  # one run per seed serves every objective (launch.py)


def study_runs(runs, objective, controller):
    return run_dirs(runs, f"static_{controller}" if controller in STATIC else f"{objective}_{controller}")


def objective_of(objective, scores, experts, fusion):
    """The objective from one set of mean scores {name: mean}: NIQE, PSNR, or the two fused as the runs fuse them
    (None when an expert gave no score: fused from the others, it would be another objective)."""
    if objective != "fused":
        return scores.get(OBJECTIVES[objective])
    if any(scores.get(e.name) is None for e in experts):
        return None
    return lossagent.fused_score(experts, {n: {"mean": v} for n, v in scores.items() if v is not None}, fusion)


def fused_reference(runs):
    """The experts (ranges, directions) and fusion settings of the fused objective, from a finished fused run."""
    for d in sorted(runs.iterdir()):  # every fused run holds the same settings
        if (d / "config.toml").is_file() and (d / "history.json").is_file():
            cfg = tomllib.loads((d / "config.toml").read_text())
            if cfg.get("fusion", {}).get("enabled"):
                directions = {e["name"]: e["lower_better"] for e in read_json(d / "history.json")["experts"]}
                experts = [lossagent.Expert(e["metric"].upper(), directions[e["metric"].upper()], "",
                                            score_range=tuple(e["range"])) for e in cfg["experts"]]
                return experts, lossagent.FusionConfig(**cfg["fusion"])
    return None, None


def study_numbers(runs):
    """{objective: {controller: [per seed: {"seed", "test", "feedback", "curve"}]}} read from the runs' files."""
    experts, fusion = fused_reference(runs)
    numbers = {}
    for objective in OBJECTIVES:
        for controller in STUDY_CONTROLLERS:
            rows = numbers.setdefault(objective, {}).setdefault(controller, [])
            for d in study_runs(runs, objective, controller):
                history, evaluation = read_json(d / "history.json"), read_json(d / "eval.json")
                if history is None or evaluation is None:
                    continue
                kept = [h for h in history["stages"] if not h.get("rolled_back")]
                curve = [objective_of(objective, {n: v.get("mean") for n, v in h["scores"].items()}, experts, fusion)
                         for h in kept]
                metrics = evaluation["datasets"]["CSet14"]["metrics"]
                test = {m.upper(): v["mean"] for m, v in metrics.items()}
                rows.append({"run": d.name, "seed": int(d.name.rsplit("seed", 1)[1]) if "_seed" in d.name else 0,
                             "test": objective_of(objective, test, experts, fusion), "feedback": curve[-1],
                             "curve": curve, "weights": [h["weights"] for h in kept],
                             "errors": [v["error"] for v in metrics.values() if v.get("error")]})
    return numbers


def study_tables(numbers, out):
    """One table per objective: test and feedback objective per controller, and the comparison with fixed weights
    paired by seed (a positive difference is better). A run whose test objective could not be scored (its network
    broke) counts as not better than fixed, is left out of the means, and is named under the table."""
    texts = {}
    for objective, controllers in numbers.items():
        lower = objective == "niqe"
        fixed = {r["seed"]: r["test"] for r in controllers.get("fixed", [])}
        rows, unscored = [], []
        for controller, runs in controllers.items():
            if not runs:
                continue
            tests = [r["test"] for r in runs]
            paired = [None if r["test"] is None else (r["test"] - fixed[r["seed"]]) * (-1 if lower else 1)
                      for r in runs if fixed.get(r["seed"]) is not None]
            wins = sum(p is not None and p > 0 for p in paired)
            failed = [r for r in runs if r["test"] is None]
            unscored += [f"{r['run']}: {'; '.join(r['errors']) or 'no test score'}" for r in failed]
            rows.append((controller, mean_std(tests), mean_std([r["feedback"] for r in runs]),
                         mean_std(paired) if controller != "fixed" else None,
                         f"{wins}/{len(paired)}" if controller != "fixed" and paired else "—",
                         f"{len(runs)}" + (f" ({len(failed)} not scorable)" if failed else "")))
        rows.sort(key=lambda r: (r[1] is None, (r[1][0] if r[1] else 0) * (1 if lower else -1)))
        name = OBJECTIVES[objective]
        arrow = "lower is better" if lower else "higher is better"
        header = ["controller", f"test {name} (CSet14)", f"feedback {name} (CSet5, last stage)",
                  "test vs fixed, paired by seed (> 0: better)", "seeds better than fixed", "seeds"]
        cells = [[c, fmt_stat(t), fmt_stat(f), fmt_stat(p, signed=True), w, n] for c, t, f, p, w, n in rows]
        md = [f"### Objective: {name} ({arrow})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
              *["| " + " | ".join(row) + " |" for row in cells],
              *(["", "Not scorable on the test set (left out of the means):", *[f"- {u}" for u in unscored]]
                if unscored else [])]
        texts[objective] = "\n".join(md) + "\n"
        (out / f"controllers_{objective}.md").write_text(texts[objective])
        with open(out / f"controllers_{objective}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *cells])
    return texts


def fmt_stat(stat, signed=False):
    if stat is None:
        return "—"
    mean, std = stat
    text = f"{mean:+.4g}" if signed else f"{mean:.4g}"
    return text if std is None else f"{text} ± {std:.2g}"


def study_figure(numbers, path):
    """The feedback objective against the stage, per objective: each controller's mean over seeds, min-max shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(numbers), figsize=(5.5 * len(numbers), 4), squeeze=False)
    for ax, (objective, controllers) in zip(axes[0], numbers.items()):
        seen = np.array([v for runs in controllers.values() for r in runs for v in r["curve"] if v is not None], dtype=float)
        for controller, runs in controllers.items():
            curves = [r["curve"] for r in runs]
            if not curves:
                continue
            length = min(map(len, curves))
            values = np.array([c[:length] for c in curves], dtype=float)  # [seeds, stages]; an unscored stage: nan
            with warnings.catch_warnings():  # a stage no seed could score has no mean: a gap in the line
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
            line, = ax.plot(range(length), mean, marker="o", markersize=3, label=controller)
            ax.fill_between(range(length), low, high, color=line.get_color(), alpha=0.15)
        title = f"{OBJECTIVES[objective]} on the feedback images"
        if seen.size:  # a network that broke (NIQE 100+) would flatten every other curve: the 2-98% range is shown
            low, high = np.percentile(seen, [2, 98])
            pad = 0.1 * (high - low) or 0.1
            ax.set_ylim(low - pad, high + pad)
            title += "\n(a few values are off the chart)" if ((seen < low - pad) | (seen > high + pad)).any() else ""
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("stage")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def study(runs, out):
    runs, out = Path(runs), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    numbers = study_numbers(runs)
    texts = study_tables(numbers, out)
    study_figure(numbers, out / "controllers_curves.png")
    (out / "controllers.json").write_text(json.dumps(numbers, indent=1))
    (out / "controllers.md").write_text("\n".join(texts.values()) + "\n![objective per stage](controllers_curves.png)\n")
    return texts, numbers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="paper", choices=["paper", "controllers"])
    parser.add_argument("--runs", help="the folder of the run directories (default: runs, or runs/controllers)")
    parser.add_argument("--out", help="where the tables go (default: runs/tables)")
    args = parser.parse_args(argv)
    runs = Path(args.runs or ("runs/controllers" if args.study == "controllers" else "runs"))
    out = Path(args.out or (runs.parent if args.study == "controllers" else runs) / "tables")
    if args.study == "controllers":
        study(runs, out)
        print(f"wrote {out}/controllers.md, controllers_<objective>.md/.csv, controllers.json, controllers_curves.png")
        return
    _, missing = aggregate(runs, out)
    print(f"wrote {out}/tables.md and table<k>.md/.csv/.tex" + (f"; {len(missing)} runs missing" if missing else ""))


if __name__ == "__main__":
    main()
