"""Every experiment of the paper as SLURM jobs, with submitit: one job per experiment (one node; its GPUs train one
run with DDP), an evaluation job after each, and the reference rows of the tables (the pre-trained networks and
the ground-truth images scored by the no-reference metrics).

    python slurm/launch.py --study paper --dry-run         # the plan: experiment, config, GPUs, tables, wall time
    python slurm/launch.py --study paper                   # submit it all; then `python slurm/aggregate.py`
    python slurm/launch.py --study paper --only cisr_niqe,cisr_baseline,gt_Set5
    python slurm/launch.py --study paper --seeds 3         # runs <exp>_seed0..2: the tables show mean ± std
    python slurm/launch.py --study paper --partition gpu --account my_project
    python slurm/launch.py --cluster local --only cisr_niqe   # no SLURM: here, one job after the other

Jobs. Training jobs of one task and GPU count form one job array (`executor.batch()`); each evaluation job
(`lossagent.py eval --ckpt runs/<name>/ckpt/last.pt`, writes runs/<name>/eval.json) waits for its training job
with a SLURM dependency (afterok). The reference jobs form one more array: `<task>_pretrained` evaluates the
official checkpoint (runs/<task>_pretrained/eval.json) and `gt_<set>` scores the ground truth of every benchmark
set (runs/gt_<set>.json). `--only` selects among all of these names.

Multi-GPU. Each job is one SLURM task (tasks_per_node=1, gpus_per_node=GPUs) that runs `torchrun --standalone` in a
subprocess, rather than one submitit task per GPU with submitit's distributed environment. torchrun is what slurm/*.sh
and the README use, so a job runs exactly the command a user would type, and the same job function works under the
local and debug executors, which have no SLURM tasks to spread over GPUs.

Requeue. The job function is a submitit Checkpointable. Before the time limit (or on preemption) submitit calls
its checkpoint(), which resubmits the same call; lossagent.py resumes from runs/<name>/ckpt/last.pt by itself, so
the requeued job continues from the last finished stage.
"""
import argparse
import math
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import submitit  # noqa: E402

import lossagent  # noqa: E402  (the repository root is on the path only now)
from data.benchmark import is_full_reference  # noqa: E402

# Expected wall time = stages x iterations / IT_PER_S + stages x STAGE_OVERHEAD_S. IT_PER_S is the training speed
# of a whole 8-GPU job (A100-80GB, the configs' batch sizes: SwinIR-M with VGG19 perceptual and UNet discriminator;
# PromptIR with VGG19 and LPIPS). These are our estimates, not measurements: no GPU was at hand when they were
# written. Replace them with the it_per_s that runs/<name>/metrics.jsonl reports on your cluster.
IT_PER_S = {"cisr": 2.0, "risr": 1.6, "air": 3.0}
STAGE_OVERHEAD_S = 120  # per stage: restore and score 10 feedback images, 10 LLM queries (rank 0; the others wait)
EVAL_S = 1800  # one evaluation job: restore every benchmark set on one GPU and score it with [eval] metrics
CPUS_PER_GPU, MEM_GB_PER_GPU = 8, 64

# One entry per trained run: its name (= the config's stem = runs/<name>/), config, GPUs, and the paper's tables it
# feeds (aggregate.py's TABLES say where). Every run also gets an evaluation job.
PAPER = [
    dict(name="cisr_baseline", config="configs/cisr_baseline.toml", gpus=8, tables=[2, 5, 7, 8, 10, 11]),
    dict(name="cisr_niqe", config="configs/cisr_niqe.toml", gpus=8, tables=[2, 7, 9]),
    dict(name="cisr_maniqa", config="configs/cisr_maniqa.toml", gpus=8, tables=[2, 8, 9]),
    dict(name="cisr_clipiqa", config="configs/cisr_clipiqa.toml", gpus=8, tables=[2, 9, 11]),
    dict(name="cisr_qalign", config="configs/cisr_qalign.toml", gpus=8, tables=[2, 5, 9, 10]),
    dict(name="cisr_qalign_psnr", config="configs/cisr_qalign_psnr.toml", gpus=8, tables=[5, 9]),
    dict(name="cisr_niqe_nodirection", config="configs/cisr_niqe_nodirection.toml", gpus=8, tables=[7, 9]),
    dict(name="cisr_maniqa_last2", config="configs/cisr_maniqa_last2.toml", gpus=8, tables=[8, 9]),
    dict(name="cisr_niqe_noexample", config="configs/cisr_niqe_noexample.toml", gpus=8, tables=[9]),
    dict(name="cisr_qalign_stage2500", config="configs/cisr_qalign_stage2500.toml", gpus=8, tables=[9, 10]),
    dict(name="cisr_qalign_stage10000", config="configs/cisr_qalign_stage10000.toml", gpus=8, tables=[9, 10]),
    dict(name="cisr_clipiqa_div2k", config="configs/cisr_clipiqa_div2k.toml", gpus=8, tables=[9, 11]),
    dict(name="risr_baseline", config="configs/risr_baseline.toml", gpus=8, tables=[3]),
    dict(name="risr_niqe", config="configs/risr_niqe.toml", gpus=8, tables=[3, 9]),
    dict(name="risr_maniqa", config="configs/risr_maniqa.toml", gpus=8, tables=[3, 9]),
    dict(name="risr_clipiqa", config="configs/risr_clipiqa.toml", gpus=8, tables=[3, 9]),
    dict(name="risr_qalign", config="configs/risr_qalign.toml", gpus=8, tables=[3, 9]),
    dict(name="air_baseline", config="configs/air_baseline.toml", gpus=8, tables=[4, 6]),
    dict(name="air_niqe", config="configs/air_niqe.toml", gpus=8, tables=[4, 9]),
    dict(name="air_maniqa", config="configs/air_maniqa.toml", gpus=8, tables=[4, 9]),
    dict(name="air_clipiqa", config="configs/air_clipiqa.toml", gpus=8, tables=[4, 9]),
    dict(name="air_qalign", config="configs/air_qalign.toml", gpus=8, tables=[4, 6, 9]),
    dict(name="air_coinstruct", config="configs/air_coinstruct.toml", gpus=8, tables=[6, 9]),
]
STUDIES = {"paper": PAPER}
# The pre-trained network and the benchmark sets of each task: its base config.
TASK_BASE = {"cisr": "configs/base/cisr.toml", "risr": "configs/base/risr.toml", "air": "configs/base/air.toml"}
# The tables with "Pre-trained" rows and with "GT (Ref.)" rows, per task.
PRETRAINED_TABLES = {"cisr": [2, 5], "risr": [3], "air": [4, 6]}
GT_TABLES = {"cisr": [2], "risr": [], "air": [4, 6]}


def plan(study, root, overrides=(), seeds=1, gpus=None, only=None):
    """The jobs of a study (or of the names in `only`), as dicts: name, experiment, kind (train | eval |
    reference), task, shown (the config column of the plan), gpus, tables, seconds (expected), argv (lossagent.py's
    arguments) and, for evaluation jobs, after (the name of their training job). Only the configs of selected jobs
    are read, so `overrides` need to fit only those."""
    sets = [f"output.root={root}", *overrides]
    jobs = []
    for exp in STUDIES[study]:
        if only is not None and exp["name"] not in only:
            continue
        for seed in range(seeds):
            name = exp["name"] if seeds == 1 else f"{exp['name']}_seed{seed}"
            run_sets = sets if seeds == 1 else [*sets, f"train.seed={seed}", f"agent.seed={seed}",
                                                f"output.name={name}"]
            cfg = lossagent.load_config(ROOT / exp["config"], run_sets)
            n = exp["gpus"] if gpus is None else gpus
            # The total batch is fixed, so fewer GPUs take proportionally longer (a CPU job counts as one GPU).
            seconds = (cfg.train.stages * cfg.train.iters_per_stage / IT_PER_S[cfg.task.name] * 8 / max(n, 1)
                       + cfg.train.stages * STAGE_OVERHEAD_S)
            flags = [a for s in run_sets for a in ("--set", s)]
            common = dict(experiment=exp["name"], task=cfg.task.name, shown=exp["config"], tables=exp["tables"])
            jobs.append(dict(name=name, kind="train", gpus=n, seconds=seconds,
                             argv=["--config", exp["config"], *flags], **common))
            ckpt = f"{root}/{cfg.output.name}/ckpt/last.pt"
            jobs.append(dict(name=f"{name}_eval", kind="eval", gpus=min(n, 1), seconds=EVAL_S, after=name,
                             argv=["eval", "--config", exp["config"], "--ckpt", ckpt, *flags], **common))
    trained = {j["task"] for j in jobs}
    for task in TASK_BASE:
        if (task in trained) if only is None else bool(reference_names(task) & set(only)):
            jobs += [j for j in references(task, root, sets, 1 if gpus is None else min(gpus, 1))
                     if only is None or j["name"] in only]
    return jobs


def reference_names(task):
    """The names of a task's reference jobs, from its base config as it is (no overrides)."""
    cfg = lossagent.load_config(ROOT / TASK_BASE[task])
    return {f"{task}_pretrained"} | {f"gt_{b.name}" for b in cfg.benchmarks if b.gt}


def references(task, root, sets, gpus):
    """The `<task>_pretrained` evaluation and one `gt_<set>` job per benchmark set with ground truth."""
    base = TASK_BASE[task]
    cfg = lossagent.load_config(ROOT / base, sets)
    flags = [a for s in sets for a in ("--set", s)]
    jobs = []

    def add(name, shown, tables, argv):
        jobs.append(dict(name=name, experiment=name, kind="reference", task=task, shown=shown, gpus=gpus,
                         tables=tables, seconds=EVAL_S, argv=argv))

    if cfg.model.pretrained:
        add(f"{task}_pretrained", f"{base} ({cfg.model.pretrained})", PRETRAINED_TABLES[task],
            ["eval", "--config", base, "--out", f"{root}/{task}_pretrained/eval.json", *flags])
    no_reference = [m for m in cfg.eval.metrics if not is_full_reference(m)]
    for b in cfg.benchmarks:
        if b.gt and no_reference and f"gt_{b.name}" not in [j["name"] for j in jobs]:
            add(f"gt_{b.name}", f"{b.gt} (ground truth)", GT_TABLES[task],
                ["eval", "--images", b.gt, "--metrics", ",".join(no_reference), "--out", f"{root}/gt_{b.name}.json"])
    return jobs


def hours(seconds):
    return f"{seconds / 3600:.1f} h"


def print_plan(jobs):
    rows = [(j["name"], j["shown"], str(j["gpus"]),
             ",".join(map(str, j["tables"])), hours(j["seconds"]) + (" + eval" if j["kind"] == "train" else ""))
            for j in jobs if j["kind"] != "eval"]
    header = ("experiment", "config", "GPUs", "tables", "expected wall time")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    train = [j for j in jobs if j["kind"] == "train"]
    gpu_hours = sum(j["seconds"] * max(j["gpus"], 1) for j in train) / 3600
    print(f"\n{len(train)} training jobs ({gpu_hours:.0f} GPU hours), {len(train)} evaluation jobs after them, "
          f"{len(jobs) - 2 * len(train)} reference jobs")


class Job(submitit.helpers.Checkpointable):
    """One job: a lossagent.py command line, run from the repository; training runs under torchrun.
    (Pickled by value with the rest of this script: submitit uses cloudpickle.)"""

    def __init__(self, argv, processes=0):
        self.argv, self.processes = argv, processes

    def __call__(self):
        if self.processes:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={self.processes}", "lossagent.py", *self.argv]
        else:
            command = [sys.executable, "lossagent.py", *self.argv]
        print(shlex.join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
        return self.argv

    def checkpoint(self, *args, **kwargs):
        # submitit calls this before the time limit or on preemption, then requeues the job. The same call is all
        # a rerun needs: lossagent.py resumes from runs/<name>/ckpt/last.pt, the last finished stage.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def resources(args, gpus, seconds, name):
    """Parameters of submitit's AutoExecutor for one node with `gpus` GPUs (0: a CPU job, no GPU request)."""
    params = dict(name=name, nodes=1, tasks_per_node=1,
                  timeout_min=math.ceil(min(1.5 * seconds + 600, args.max_hours * 3600) / 60),
                  cpus_per_task=args.cpus_per_task or (CPUS_PER_GPU * gpus if gpus else 8),
                  mem_gb=args.mem_gb or (MEM_GB_PER_GPU * gpus if gpus else 32),
                  slurm_signal_delay_s=300,
                  slurm_additional_parameters={"requeue": True})
    if gpus:
        params["gpus_per_node"] = gpus
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.account:
        params["slurm_account"] = args.account
    return params


def submit(jobs, args):
    """Submits the plan. SLURM: arrays per (task, GPUs), evaluation jobs with afterok on their training job.
    local and debug: one job after the other, since nothing would hold back a job whose input is not ready."""
    folder = Path(args.root).resolve() / "slurm" / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)

    def command(j):
        return Job(j["argv"], max(j["gpus"], 1) if j["kind"] == "train" else 0)

    submitted = {}
    if args.cluster != "slurm":
        for j in jobs:
            executor.update_parameters(**resources(args, j["gpus"], j["seconds"], j["name"]))
            job = executor.submit(command(j))
            print(f"{j['name']}: job {job.job_id}", flush=True)
            job.result()  # raises if it failed, with the job's log
            submitted[j["name"]] = job.job_id
        return submitted

    groups = {}
    for j in jobs:
        if j["kind"] != "eval":
            key = ("reference", j["gpus"]) if j["kind"] == "reference" else (j["task"], j["gpus"])
            groups.setdefault(key, []).append(j)
    for (label, gpus), group in groups.items():
        executor.update_parameters(**resources(args, gpus, max(j["seconds"] for j in group), f"lossagent-{label}"))
        with executor.batch():
            handles = [executor.submit(command(j)) for j in group]
        for j, job in zip(group, handles):
            submitted[j["name"]] = job.job_id
            print(f"{j['name']}: job {job.job_id}", flush=True)
    for j in jobs:
        if j["kind"] == "eval":
            params = resources(args, j["gpus"], j["seconds"], "lossagent-eval")
            # afterok: only once training succeeded; a failed training cancels its evaluation instead of leaving it
            # pending forever (DependencyNeverSatisfied).
            params["slurm_additional_parameters"] = {"requeue": True, "dependency": f"afterok:{submitted[j['after']]}",
                                                     "kill-on-invalid-dep": "yes"}
            executor.update_parameters(**params)
            job = executor.submit(command(j))
            submitted[j["name"]] = job.job_id
            print(f"{j['name']}: job {job.job_id} (after {submitted[j['after']]})", flush=True)
    return submitted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    parser.add_argument("--study", default="paper", choices=sorted(STUDIES))
    parser.add_argument("--only", help="comma-separated job names (experiments, <task>_pretrained, gt_<set>)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    parser.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                        help="slurm; local (subprocesses here) or debug (in this process) for trying without SLURM")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting of every run and evaluation (repeatable)")
    parser.add_argument("--root", default="runs", help="run directories, reference JSONs and job logs (output.root)")
    parser.add_argument("--seeds", type=int, default=1, help="train every experiment with seeds 0..N-1")
    parser.add_argument("--gpus", type=int, help="GPUs per training job instead of each experiment's (0: CPU)")
    parser.add_argument("--cpus-per-task", type=int, help=f"default: {CPUS_PER_GPU} per GPU")
    parser.add_argument("--mem-gb", type=int, help=f"default: {MEM_GB_PER_GPU} per GPU")
    parser.add_argument("--max-hours", type=float, default=24.0,
                        help="time limit cap per job; a longer run is requeued and resumes (default 24)")
    parser.add_argument("--max-requeues", type=int, default=30, help="requeues after time limits, per job")
    parser.add_argument("--partition", help="SLURM partition (default: $SBATCH_PARTITION or the cluster's)")
    parser.add_argument("--account", help="SLURM account (default: $SBATCH_ACCOUNT or yours)")
    args = parser.parse_args(argv)

    only = args.only.split(",") if args.only else None
    if only:
        names = {e["name"] for e in STUDIES[args.study]}.union(*(reference_names(t) for t in TASK_BASE))
        unknown = [w for w in only if w not in names]
        if unknown:
            sys.exit(f"error: --only {','.join(unknown)}: not in the study; its names: {', '.join(sorted(names))}")
    try:
        # Absolute, because the jobs run from the repository whatever the folder this is called from.
        jobs = plan(args.study, str(Path(args.root).resolve()), args.set, args.seeds, args.gpus, only)
    except lossagent.ConfigError as e:
        sys.exit(f"error: {e}")
    print_plan(jobs)
    if not args.dry_run:
        submit(jobs, args)


if __name__ == "__main__":
    main()
