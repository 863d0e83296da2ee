"""What a run shows a person: history.json, report.md (the stage table and the format success rate),
curves.png (weight and score curves per stage, the paper's Figure 4), experience.json, and the peak memory of
each phase of a stage."""
import re
from pathlib import Path

import numpy as np
import torch

from tools.rundir import attempt_folder, write_atomic, write_json


def fmt(x):
    return f"{x:.4g}"


def weights_text(names, weights):
    return f"{':'.join(names)}={':'.join(fmt(w) for w in weights)}"


def parse_counts(history):
    """(replies parsed, replies) over the whole run."""
    return sum(h.get("parse_ok", 0) for h in history), sum(h.get("parse_total", 0) for h in history)


def score_columns(history):
    """The numbers per stage: (name, [value or None per entry]) for each score expert's mean and the fused score."""
    names = []
    for h in history:
        names += [k for k, v in h["scores"].items() if "mean" in v and k not in names]
    columns = [(n, [h["scores"][n]["mean"] if n in h["scores"] else None for h in history]) for n in names]
    if any(h.get("fused") is not None for h in history):
        columns.append(("Fused", [h.get("fused") for h in history]))
    return columns


def write_run_files(cfg, run_dir, history, finished, experts, feedback, changes):
    """What is derived from the checkpoint after `finished` decided stages: no more attempt states of those stages,
    and what a person reads, history.json, experience.json, curves.png, report.md. Written after every stage, and
    again on resume, so that a run killed after its checkpoint and before these files heals. `changes(before, after)`:
    each score expert's relative change, > 0 = better (for experience.json)."""
    for old in (run_dir / "ckpt").glob("stage_*_attempt_*.pt"):
        if int(old.stem.split("_")[1]) <= finished:
            old.unlink()
    write_history(run_dir, cfg.losses.names, [item["name"] for item in feedback], experts, cfg.train.iters_per_stage,
                  history)
    write_experience(run_dir / "experience.json", cfg, history, changes)
    save_plot(history, cfg.losses.names, run_dir / "curves.png")
    write_report(run_dir, cfg, cfg.losses.names, history)


def write_history(run_dir, names, feedback_names, experts, iters_per_stage, history):
    parse_ok, parse_total = parse_counts(history)
    summary = {"names": names, "feedback": feedback_names,
               "experts": [{"name": e.name, "lower_better": e.lower_better, "meaning": e.meaning} for e in experts],
               "parse_ok": parse_ok, "parse_total": parse_total,
               "extra_iterations": iters_per_stage * sum(bool(h.get("rolled_back")) for h in history),
               "stages": history}
    write_json(run_dir / "history.json", summary)


def save_plot(history, names, path):
    """Weight curves and score curves per stage (the paper's Figure 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    kept = np.array([not h.get("rolled_back") for h in history])
    stages = np.array([h["stage"] for h in history])
    experts = score_columns(history)
    fig, axes = plt.subplots(1, 1 + len(experts), figsize=(4.5 * (1 + len(experts)), 3.5), squeeze=False)
    curves = [(axes[0, 0], [[h["weights"][n] for h in history] for n in names], names)]
    curves += [(ax, [values], [None]) for ax, (_, values) in zip(axes[0, 1:], experts)]
    for ax, lines, labels in curves:
        for values, label in zip(lines, labels):
            values = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(stages[kept], values[kept], marker="o", label=label)
            if not kept.all():  # undone attempts (reflection): crosses where they landed
                ax.plot(stages[~kept], values[~kept], "rx", markersize=9)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # stages are whole numbers
    axes[0, 0].set(title="loss weights", xlabel="stage", ylabel="weight")
    axes[0, 0].set_yscale("symlog", linthresh=1e-3)  # weights span decades and may be 0
    axes[0, 0].legend()
    for ax, (e, _) in zip(axes[0, 1:], experts):
        ax.set(title=f"{e} (mean over feedback images)", xlabel="stage")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def write_report(run_dir, cfg, names, history):
    columns = score_columns(history)
    experts = [name for name, _ in columns]
    rows = [f"| {h['stage']} | {h['iteration']} | {weights_text(names, [h['weights'][n] for n in names])} | "
            + " | ".join("—" if values[i] is None else fmt(values[i]) for _, values in columns)
            + f" | {h.get('parse_ok', '')}/{h.get('parse_total', '')} | {h.get('fallback') or ''}"
            + (" | undone" if h.get("rolled_back") else " | ")
            + f" | [sheet](feedback/{attempt_folder(h)}/sheet.png) |" for i, h in enumerate(history)]
    parse_ok, parse_total = parse_counts(history)
    rate = f"{100 * parse_ok / parse_total:.2f}% ({parse_ok}/{parse_total})" if parse_total else "no queries"
    undone = sum(bool(h.get("rolled_back")) for h in history)
    if undone:
        rate += f" Reflection undid {undone} attempts ({undone * cfg.train.iters_per_stage} extra iterations)."
    text = "\n".join([f"# {cfg.output.name}", "",
                      f"Task {cfg.task.name}, {cfg.model.arch}, agent {cfg.agent.backend} {cfg.agent.model}. "
                      f"Format success rate: {rate}.", "",
                      f"| stage | iteration | weights | {' | '.join(experts)} | parsed | fallback | reflection | images |",
                      "|" + "---|" * (7 + len(experts)), *rows, "", "![curves](curves.png)", ""])
    write_atomic(run_dir / "report.md", lambda p: p.write_text(text))
    return text


def write_experience(path, cfg, history, changes):
    """Experience memory (experience.json): which weight changes moved which expert, by how much, how often, over a
    run's kept stages, as rules and as the text a later run shows its agent (agent.experience). `changes(before,
    after)` gives each score expert's relative change, > 0 = better."""
    names, kept = cfg.losses.names, [h for h in history if not h.get("rolled_back")]
    effects = {}
    for before, after in zip(kept[1:], kept[2:]):  # the weights of `after` moved from those of `before`
        for n in names:
            if after["weights"][n] == before["weights"][n]:
                continue
            way = "raising" if after["weights"][n] > before["weights"][n] else "lowering"
            for expert, change in changes(before, after).items():
                row = effects.setdefault((n, way, expert), {"times": 0, "better": 0, "changes": []})
                row["times"] += 1
                row["better"] += change > 0
                row["changes"].append(change)
    rows = [{"loss": n, "change": way, "expert": e, "times": r["times"], "better": r["better"],
             "mean_relative_change": float(np.mean(r["changes"]))} for (n, way, e), r in effects.items()]
    lines = [f"- {r['change'].capitalize()} {r['loss']} made {r['expert']} better {r['better']} of {r['times']} times "
             f"(mean relative change {100 * r['mean_relative_change']:+.1f}%, positive = better)." for r in rows]
    text = (f"In an earlier run ({cfg.output.name}: {cfg.task.name}, losses {':'.join(names)}):\n" + "\n".join(lines)
            if lines else "")
    summary = {"run": cfg.output.name, "names": names, "rules": rows, "text": text}
    write_json(path, summary)


def peak_memory_mib(device):
    """The peak memory since the previous call, in MiB, and a fresh count for the next phase: CUDA memory
    allocated on a GPU, the process's resident set on a CPU (Linux only; None elsewhere)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return round(peak / 2**20)
    try:
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM, the peak resident set (Linux >= 4.0)
        return round(peak / 1024)
    except (OSError, AttributeError):
        return None


def write_sheet(path, feedback, restored, scores):
    """A stage's feedback at a glance (feedback/stage_<i>/sheet.png): per image a row of its input (enlarged to the
    output's size), the restored image and the ground truth where there is one, at most 200 pixels high, with the
    experts' scores written under it."""
    from PIL import Image, ImageDraw, ImageFont

    from data.images import to_8bit

    def picture(t, size):  # [1, 3, h, w] in [0, 1] -> a PIL image of `size`
        array = to_8bit(t[0].float()).mul(255).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array).resize(size, Image.NEAREST)

    font, rows = ImageFont.load_default(), []
    for k, (item, out) in enumerate(zip(feedback, restored)):
        h, w = out.shape[-2:]
        scale = min(1.0, 200 / h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        panels = [picture(item["lq"], size), picture(out, size)] + ([picture(item["gt"], size)] if item["gt"] is not None else [])
        titles = ["input", "restored"] + (["ground truth"] if item["gt"] is not None else [])
        said = [f"{name} {fmt(s['per_image'][k])}" if "mean" in s else f"{name}: {' '.join(s['per_image'][k].split())[:60]}"
                for name, s in scores.items()]
        row = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), size[1] + 34), "white")
        draw, x = ImageDraw.Draw(row), 0
        for panel, title in zip(panels, titles):
            row.paste(panel, (x, 0))
            draw.text((x + 2, size[1] + 2), title, fill="gray", font=font)
            x += panel.width + 4
        draw.text((2, size[1] + 18), f"{item['name']}: " + (", ".join(said) or "no scores"), fill="black", font=font)
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 6 for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + 6
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: sheet.save(p, format="PNG"))
