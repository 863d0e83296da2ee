"""slurm/: the study plan, the table aggregation, and (where `sbatch` exists) real jobs on a one-node SLURM cluster.

The SLURM tests use the cluster that $SLURM_CONF (or slurm/ci_cluster.sh's default) names; when none answers and
this is root on a machine with the SLURM daemons installed, they start one with slurm/ci_cluster.sh and stop it
afterwards. Jobs run tiny CPU versions of the experiments (2 stages, a SwinIR of 12 channels) and finish in seconds;
the whole file takes about 4 minutes on 2 cores, most of it Python start-up inside the jobs.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slurm"))

import aggregate  # noqa: E402
import launch  # noqa: E402

import lossagent  # noqa: E402
from test_run import tiny_config as run_tiny_config  # noqa: E402

CI_CONF = Path(os.environ.get("LOSSAGENT_SLURM_DIR", "/tmp/lossagent-slurm")) / "slurm.conf"

# A paper config shrunk to seconds on a CPU: tiny SwinIR, no Perceptual loss (its VGG19 file is not here), images from
# scikit-image, the fixed-weight agent (no LLM), every benchmark set one small photo.
TINY = [
    'model.args={ upscale = 4, img_size = 16, window_size = 4, depths = [1], embed_dim = 12, num_heads = [2], '
    'mlp_ratio = 2.0, upsampler = "pixelshuffle", resi_connection = "1conv" }',
    'model.pretrained=""', 'model.pretrained_key=""',
    'losses.names=["L1", "SSIM", "GAN"]', "losses.weights=[1.0, 0.1, 0.01]",
    "losses.options={ GAN = { num_feat = 8 } }",
    "train.stages=2", "train.iters_per_stage=2", "train.batch_size=2", "train.num_workers=0", "train.log_every=1",
    'data.train=["skimage:astronaut", "skimage:coffee"]', "data.patch_size=16",
    'feedback.sources=["skimage:chelsea", "skimage:rocket"]', "feedback.count=2", "feedback.max_side=192",
    "agent.backend=fixed",
    *[f"benchmarks.{i}.gt=skimage:{photo}" for i, photo in enumerate(["chelsea", "rocket", "coffee", "astronaut",
                                                                         "camera"])],
    'eval.metrics=["psnr", "niqe"]',
]

# The demo shrunk the same way, as a config file for the sbatch scripts (CONFIG=...).
def tiny_config(tmp_path, stages=2, iters=2):
    """The end-to-end tests' tiny CPU run (tests/test_run.py), with fixed weights: no LLM inside SLURM jobs."""
    return run_tiny_config(tmp_path, stages=stages, iters=iters, backend="fixed")


# -----------------------------------------------------------------------------
# Without SLURM: configs, the plan, the tables.

def test_every_config_loads_including_the_bases():
    paths = sorted((ROOT / "configs").rglob("*.toml"))
    assert len(paths) > 25
    for path in paths:
        lossagent.load_config(path)


def test_ablation_configs_change_only_their_setting():
    def settings(name):  # {(section, key): value}; array sections (experts, benchmarks) as one entry
        config = lossagent.asdict(lossagent.load_config(ROOT / "configs" / f"{name}.toml"))
        return {(section, key): value for section, table in config.items()
                for key, value in (table.items() if isinstance(table, dict) else [("", table)])}

    full = settings("cisr_niqe")

    def diff(name):
        return {key for key, value in settings(name).items() if full[key] != value}

    assert diff("cisr_niqe_nodirection") == {("agent", "direction_sentence"), ("output", "name")}
    assert diff("cisr_niqe_noexample") == {("agent", "format_example"), ("output", "name")}
    assert diff("cisr_baseline") == {("agent", "backend"), ("output", "name")}
    stage = lossagent.load_config(ROOT / "configs" / "cisr_qalign_stage2500.toml").train
    assert (stage.stages, stage.iters_per_stage) == (20, 2500)
    coinstruct = lossagent.load_config(ROOT / "configs" / "air_coinstruct.toml").experts
    assert [(e.kind, e.name, e.output) for e in coinstruct] == [("command", "Co-Instruct", "text")]


def test_dry_run_lists_every_experiment_of_tables_2_to_11():
    result = subprocess.run([sys.executable, str(ROOT / "slurm" / "launch.py"), "--study", "paper", "--dry-run"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:7] == ["experiment", "config", "GPUs", "tables", "expected", "wall", "time"]
    runs = re.findall(r"^(\S+)\s+configs/(\S+)\.toml\s+(\d+)\s+([\d,]+)\s", result.stdout, re.MULTILINE)
    assert [name for name, stem, _, _ in runs] == [stem for _, stem, _, _ in runs]
    configs = {p.stem for p in (ROOT / "configs").glob("*.toml")} - {"demo"}
    assert {name for name, _, _, _ in runs} == configs
    assert {int(t) for *_, tables in runs for t in tables.split(",")} == set(range(2, 12))
    rows = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert re.search(r"cisr_niqe\s+configs/cisr_niqe.toml\s+8\s+2,7,9\s+7\.3 h \+ eval", result.stdout)
    assert {"cisr_pretrained", "risr_pretrained", "air_pretrained", "gt_Set5", "gt_Manga109", "gt_BSD68"} <= set(rows)
    assert "23 training jobs" in result.stdout and "23 evaluation jobs" in result.stdout


def test_plan_seeds_only_and_overrides():
    jobs = launch.plan("paper", "/r", ["train.stages=2"], seeds=2, gpus=0, only=["cisr_niqe", "gt_Set14"])
    assert [(j["name"], j["kind"]) for j in jobs] == [
        ("cisr_niqe_seed0", "train"), ("cisr_niqe_seed0_eval", "eval"),
        ("cisr_niqe_seed1", "train"), ("cisr_niqe_seed1_eval", "eval"), ("gt_Set14", "reference")]
    train, evaluate = jobs[2], jobs[3]
    assert train["gpus"] == 0 and evaluate["after"] == "cisr_niqe_seed1"
    assert "train.seed=1" in train["argv"] and "output.name=cisr_niqe_seed1" in train["argv"]
    assert evaluate["argv"][:5] == ["eval", "--config", "configs/cisr_niqe.toml", "--ckpt",
                                    "/r/cisr_niqe_seed1/ckpt/last.pt"]
    assert jobs[4]["argv"] == ["eval", "--images", "datasets/benchmark/Set14/HR",
                               "--metrics", "niqe,maniqa,clipiqa,qalign", "--out", "/r/gt_Set14.json"]
    # 2 stages x 5000 iterations at 2 it/s on 8 GPUs; a CPU job counts as one GPU, 8 times slower
    assert train["seconds"] == pytest.approx(2 * 5000 / 2.0 * 8 + 2 * launch.STAGE_OVERHEAD_S)


def test_tables_and_study_agree():
    """Every run a table shows is an experiment of the study that lists that table, and the other way round."""
    jobs = launch.plan("paper", "/r")
    listed = {(j["experiment"], t) for j in jobs if j["kind"] != "eval" for t in j["tables"]}
    shown = set()
    for table in aggregate.TABLES:
        sets = aggregate.SETS.get(table.get("task"), [])
        for _, rows in table.get("blocks", []):
            for _, source in rows:
                names = [f"gt_{s.split('_sigma')[0]}" for s in sets] if source == aggregate.GT else [source]
                shown |= {(n, table["number"]) for n in names}
        shown |= {(name, table["number"]) for name in table.get("runs", [])}
    assert shown - listed == set(), "tables show runs the study does not make for them"
    assert listed - shown == set(), "the study makes runs for tables that do not show them"


def write_run(runs, name, datasets, history=None, config=None):
    d = runs / name
    d.mkdir(parents=True)
    scores = {s: {"metrics": {m: {"mean": v, "per_image": {}} for m, v in metrics.items()}}
              for s, metrics in datasets.items()}
    (d / "eval.json").write_text(json.dumps({"ckpt": "x", "datasets": scores}))
    if history is not None:
        (d / "history.json").write_text(json.dumps(history))
    if config is not None:
        (d / "config.toml").write_text(config)


def history(ok, total, weights):
    names = ["L1", "Perceptual", "GAN"]
    return {"names": names, "parse_ok": ok, "parse_total": total,
            "stages": [{"stage": i, "weights": dict(zip(names, w))} for i, w in enumerate(weights)]}


def test_aggregate_writes_tables_with_best_values_seeds_and_missing_runs(tmp_path):
    runs = tmp_path / "runs"
    sets = aggregate.SETS["cisr"]
    write_run(runs, "cisr_pretrained", {s: {"niqe": 6.0, "psnr": 30.0} for s in sets})
    write_run(runs, "cisr_baseline", {s: {"niqe": 5.0, "psnr": 29.0} for s in sets})
    # two seeds of the NIQE run: NIQE 4.0 and 4.2 everywhere but Manga109, which the second seed lacks
    curve = [[1.0, 0.1, 0.01], [0.8, 0.3, 0.02]]
    write_run(runs, "cisr_niqe_seed0", {s: {"niqe": 4.0, "psnr": 28.0} for s in sets}, history(9, 10, curve),
              '[agent]\nformat_example = true\n')
    write_run(runs, "cisr_niqe_seed1", {s: {"niqe": 4.2, "psnr": 28.5} for s in sets[:4]}, history(10, 10, curve),
              '[agent]\nformat_example = true\n')
    write_run(runs, "cisr_niqe_noexample", {}, history(3, 10, curve), '[agent]\nformat_example = false\n')
    for s in sets:
        (runs / f"gt_{s}.json").write_text(json.dumps({"metrics": {"niqe": {"mean": 3.0, "per_image": {}}}}))

    texts, missing = aggregate.aggregate(runs, tmp_path / "tables")
    table2 = texts[2].splitlines()
    assert table2[2] == "| Metric | Method | Set5 | Set14 | BSD100 | Urban100 | Manga109 | Avg |"
    niqe = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in table2[4:8]}
    assert niqe["Pre-trained"] == ["6.000"] * 6
    assert niqe["LossAgent (NIQE)"][:4] == ["**4.100 ± 0.141**"] * 4  # lower is better: bold
    assert niqe["LossAgent (NIQE)"][4:] == ["**4.000**", "**4.000**"]  # one seed: Avg of the seed that has all sets
    assert niqe["GT (Ref.)"] == ["3.000"] * 6  # a reference: never bold
    psnr = [line for line in table2 if "| PSNR ↑ |" in line][0]
    assert "**30.00**" in psnr  # higher is better: the pre-trained network's PSNR is the best
    assert "| LossAgent (MANIQA) | — | — | — | — | — | — |" in texts[2]
    assert "cisr_maniqa" in missing and "cisr_niqe" not in missing
    table9 = texts[9]
    assert "| cisr_niqe | yes | 95.00% (19/20) |" in table9
    assert "| cisr_niqe_noexample | no | 30.00% (3/10) |" in table9
    assert "| All runs with the format example | yes | 95.00% (19/20) |" in table9
    csv_rows = (tmp_path / "tables" / "table2.csv").read_text().splitlines()
    assert csv_rows[0] == "Metric,Method,Set5,Set14,BSD100,Urban100,Manga109,Avg" and len(csv_rows) == 1 + 4 * 4 + 2 * 6
    tex = (tmp_path / "tables" / "table2.tex").read_text()
    assert "\\textbf{4.100 $\\pm$ 0.141}" in tex and "\\end{tabular}" in tex
    summary = (tmp_path / "tables" / "tables.md").read_text()
    assert "## Missing runs" in summary and "- cisr_maniqa: no " in summary
    assert (tmp_path / "tables" / "figure4_cisr.png").stat().st_size > 1000
    assert not (tmp_path / "tables" / "figure4_air.png").exists()


# -----------------------------------------------------------------------------
# On a real SLURM cluster.

def slurm(*args, env=None, check=True):
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr}")
    return result.stdout


def cluster_up(env):
    return subprocess.run(["sinfo", "-h"], capture_output=True, env=env, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    """The environment of a working SLURM cluster (started here if needed and possible)."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: install SLURM (Debian: apt-get install slurmctld slurmd slurm-client munge)")
    env = dict(os.environ)
    if "SLURM_CONF" not in env and CI_CONF.exists():
        env["SLURM_CONF"] = str(CI_CONF)
    started = False
    if not cluster_up(env):
        if os.geteuid() != 0 or shutil.which("slurmctld") is None:
            pytest.skip("no SLURM controller answers; start one with `eval \"$(slurm/ci_cluster.sh start)\"` (root)")
        out = subprocess.run([str(ROOT / "slurm" / "ci_cluster.sh"), "start"], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        env["SLURM_CONF"] = str(CI_CONF)
        started = True
    jobs = []
    yield env, jobs
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, env=env)
    if started:
        subprocess.run([str(ROOT / "slurm" / "ci_cluster.sh"), "stop"], capture_output=True)


def job_info(job, env):
    """{'JobState': ..., 'Restarts': ..., ...} of a job, or {} once SLURM has forgotten it."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def wait_for(jobs, env, timeout=600):
    deadline = time.time() + timeout
    states = {}
    while time.time() < deadline:
        states = {job: job_info(job, env).get("JobState", "GONE") for job in jobs}
        if all(s in FINISHED | {"GONE"} for s in states.values()):
            return states
        time.sleep(1)
    raise TimeoutError(f"jobs still running after {timeout} s: {states}")


def job_env(cluster, tmp_path, **extra):
    env, _ = cluster
    return {**env, "PYTHON": sys.executable, "SBATCH_OUTPUT": str(tmp_path / "%x-%j.out"), **extra}


def submitted_id(stdout):
    return re.search(r"Submitted batch job (\d+)", stdout).group(1)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sbatch_headers_are_valid_and_name_existing_configs(cluster, tmp_path):
    env = job_env(cluster, tmp_path, SBATCH_GRES="none")
    for task in ("cisr", "risr", "air"):
        script = ROOT / "slurm" / f"{task}.sh"
        text = script.read_text()
        for flag in ("--gres=gpu:8", "--requeue", "--signal=B:USR1@300", "--output=runs/slurm/%x-%j.out"):
            assert f"#SBATCH {flag}" in text
        default = re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", text).group(1)
        lossagent.load_config(ROOT / default)
        result = subprocess.run(["sbatch", "--test-only", "-c", "1", "--mem=1G", str(script)],
                                capture_output=True, text=True, env=env, cwd=ROOT)
        assert result.returncode == 0 and "to start at" in result.stderr, result.stderr


def test_script_run_outside_a_job_submits_itself_with_resources_for_gpus(cluster, tmp_path):
    env = job_env(cluster, tmp_path, CONFIG=str(tiny_config(tmp_path)))
    # GPUS=2: the request names the GPUs (this cluster has none, so SLURM refuses it, which shows what was asked)
    result = subprocess.run(["bash", str(ROOT / "slurm" / "air.sh")], capture_output=True, text=True,
                            env={**env, "GPUS": "2"}, cwd=tmp_path)
    assert result.returncode != 0 and "Invalid generic resource (gres) specification" in result.stderr
    # GPUS=0: a CPU job without any GPU request, CPUS and MEM as given
    out = slurm("bash", str(ROOT / "slurm" / "air.sh"), env={**env, "GPUS": "0", "CPUS": "1", "MEM": "1G"})
    job = submitted_id(out)
    cluster[1].append(job)
    info = job_info(job, cluster[0])
    slurm("scancel", job, env=cluster[0])
    assert info["JobName"] == "lossagent-air" and info["NumCPUs"] == "1" and info["MinMemoryNode"] == "1G"
    assert "gres" not in info.get("TresPerNode", "") and info["Requeue"] == "1"
    assert info["WorkDir"] == str(ROOT)  # the script submits from the repository, wherever it is called from


def test_sbatch_cisr_requeued_before_the_time_limit_resumes_from_the_last_stage(cluster, tmp_path):
    """`sbatch slurm/cisr.sh` of a tiny CPU run (SBATCH_GRES=none drops the GPU request, GPUS=1 process). USR1 is what
    SLURM sends 300 s before the time limit: the script stops the run and requeues the job, and the rerun resumes."""
    env = job_env(cluster, tmp_path, SBATCH_GRES="none", GPUS="1", CONFIG=str(tiny_config(tmp_path, stages=3, iters=6)))
    out = slurm("sbatch", "-c", "1", "--mem=2G", str(ROOT / "slurm" / "cisr.sh"),
                "--set", f"output.root={tmp_path / 'runs'}", "--set", "output.name=from_sbatch", env=env)
    job = submitted_id(out)
    cluster[1].append(job)
    run = tmp_path / "runs" / "from_sbatch"
    wait_for_file(run / "ckpt" / "stage_1.pt", job, cluster[0])
    slurm("scancel", "--batch", "--signal=USR1", job, env=env)
    release_requeued(job, cluster[0])
    assert wait_for([job], env)[job] in ("COMPLETED", "GONE")

    log = (tmp_path / f"lossagent-cisr-{job}.out").read_text()
    assert f"job {job} (restart 0) on" in log and "1 process(es)" in log, log
    assert "time limit near: stopping the run, requeueing" in log and f"job {job} (restart 1)" in log, log
    assert re.search(r"resuming \S+ after stage [12]\b", log), log
    history = json.loads((run / "history.json").read_text())
    assert [s["stage"] for s in history["stages"]] == [0, 1, 2, 3]
    assert [r["iteration"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 19))  # none repeated or lost
    assert (run / "ckpt" / "last.pt").exists() and (run / "report.md").exists()


def wait_for_file(path, job, env, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        state = job_info(job, env).get("JobState")
        assert time.time() < deadline and state in ("PENDING", "RUNNING"), f"job {job} is {state}, no {path}"
        time.sleep(0.2)


def release_requeued(job, env):
    """SLURM holds a requeued job for two minutes (its begin time) so that the node forgets the old job credential
    first. Release it sooner; but a start within the second of the requeue is refused ("credential revoked")."""
    deadline = time.time() + 120
    while job_info(job, env).get("Restarts", "0") == "0" or job_info(job, env).get("JobState") != "PENDING":
        assert time.time() < deadline, job_info(job, env)
        time.sleep(0.2)
    time.sleep(3)
    slurm("scontrol", "update", f"JobId={job}", "StartTime=now", env=env)


def launch_tiny(env, runs, only, sets, cwd=ROOT):
    """slurm/launch.py on SLURM: CPU jobs of one CPU and 1 GB, the experiments shrunk by `sets`."""
    return subprocess.run([sys.executable, str(ROOT / "slurm" / "launch.py"), "--cluster", "slurm", "--root", str(runs),
                           "--only", only, "--gpus", "0", "--cpus-per-task", "1", "--mem-gb", "1",
                           *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_launch_grid_with_preemption_evaluations_and_aggregated_tables(niqe_torch_home, cluster, tmp_path):
    """Two experiments as one job array, their evaluation jobs (afterok) and a ground-truth job. One training job
    is preempted (USR2, submitit's signal, also sent before the time limit): its Checkpointable requeues the same
    call, the run resumes, and its evaluation waits for the requeued job. Then aggregate.py fills Table 2."""
    env = {**cluster[0], "TORCH_HOME": str(niqe_torch_home)}
    runs = tmp_path / "runs"
    longer = [*TINY, "train.stages=3", "train.iters_per_stage=6"]
    result = launch_tiny(env, runs, "cisr_baseline,cisr_niqe,gt_Set5", longer, cwd=tmp_path)  # from elsewhere
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = dict(re.findall(r"^(\w+): job (\S+)", result.stdout, re.MULTILINE))
    cluster[1].extend(jobs.values())
    assert set(jobs) == {"cisr_baseline", "cisr_niqe", "gt_Set5", "cisr_baseline_eval", "cisr_niqe_eval"}
    assert jobs["cisr_baseline"].split("_")[0] == jobs["cisr_niqe"].split("_")[0]  # one job array
    assert f"cisr_niqe_eval: job {jobs['cisr_niqe_eval']} (after {jobs['cisr_niqe']})" in result.stdout

    job = jobs["cisr_niqe"]
    wait_for_file(runs / "cisr_niqe" / "ckpt" / "stage_1.pt", job, env)
    slurm("scancel", "--signal=USR2", job, env=env)
    release_requeued(job, env)
    states = wait_for(list(jobs.values()), env)
    logs = {p.name: p.read_text() for p in (runs / "slurm" / "submitit").rglob("*_log.*")}
    assert set(states.values()) <= {"COMPLETED", "GONE"}, (states, logs)
    log = logs[f"{job}_0_log.out"]
    assert "Requeued job" in log and re.search(r"resuming \S+ after stage [12]\b", log), log[-3000:]

    for name in ("cisr_baseline", "cisr_niqe"):
        history = json.loads((runs / name / "history.json").read_text())
        assert [s["stage"] for s in history["stages"]] == [0, 1, 2, 3]
        assert [r["iteration"] for r in read_jsonl(runs / name / "metrics.jsonl")] == list(range(1, 19))
        scores = json.loads((runs / name / "eval.json").read_text())["datasets"]
        assert set(scores) == set(aggregate.SETS["cisr"]) and set(scores["Set5"]["metrics"]) == {"psnr", "niqe"}
    assert "NIQE" in json.loads((runs / "cisr_niqe" / "history.json").read_text())["stages"][0]["scores"]
    assert json.loads((runs / "gt_Set5.json").read_text())["metrics"]["niqe"]["mean"] > 0

    texts, missing = aggregate.aggregate(runs, tmp_path / "tables")
    rows = {line.split("|")[2].strip(): line for line in texts[2].splitlines()[4:8]}  # the NIQE block
    assert list(rows) == ["Pre-trained", "Baseline", "LossAgent (NIQE)", "GT (Ref.)"]
    assert "—" not in rows["Baseline"] and "—" not in rows["LossAgent (NIQE)"]
    assert re.match(r"\|\s*\| GT \(Ref\.\) \| \d+\.\d{3} \| — \| — \| — \| — \| — \|", rows["GT (Ref.)"])
    assert "cisr_pretrained" in missing and "cisr_baseline" not in missing and "cisr_niqe" not in missing
