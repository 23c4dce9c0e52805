"""Submit pretraining, evaluation or fine-tuning to SLURM with submitit, on one or many nodes.

    python run_with_submitit.py --nodes 2 --ngpus 4 --partition gpu --timeout 2880 \\
        --arch vit_small --data_mode mc --data_path /data/seasonal_contrast_100k --output_dir runs/mc
    python run_with_submitit.py --script eval_linear --ngpus 1 --partition gpu ... (eval_linear's own flags)
    python run_with_submitit.py --script eval_knn --ngpus 0 --partition cpu ...   (CPU only, no GPU requested)
    python run_with_submitit.py --cluster local --ngpus 2 ...   (same code path on this machine)

The launcher's flags are read first; every other flag goes to the chosen script's parser, here on the login
node, so that a typo fails before the job waits in the queue. A job runs one task per GPU, or with --ngpus 0
--tasks_per_node tasks on the CPUs (gloo); each task exports torchrun's variables (master address from the
node list, rank, local rank, world size) from the job environment, so the script's
``utils.init_distributed_mode`` sets up torch.distributed on the same path as under torchrun. When sbatch
refuses the job, the launcher says why in one line and names the flag to change (exit code 2).

Timeout and preemption: SLURM sends SIGUSR2 ``--signal_delay_s`` seconds before it kills the job; submitit
then calls ``Trainer.checkpoint`` on rank 0 and requeues the job with the same arguments (``scontrol requeue``,
retried while SLURM is busy ending the job). The scripts save ``output_dir/checkpoint.pth`` atomically and
resume from it on start, so the requeued job (and any later resubmission with the same ``--output_dir``)
continues from its last checkpoint. A job that reaches --timeout more than --max_timeouts times, or is
requeued more than --max_requeues times in all, stops with one line saying so instead of coming back.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import submitit
import torch

import utils

REPO_DIR = Path(__file__).resolve().parent
SCRIPTS = ("main_dino_mc", "eval_knn", "eval_linear", "finetune_eurosat", "finetune_bigearthnet", "finetune_oscd")
REQUEUE_ATTEMPTS = 6  # scontrol requeue tries, 1 + 2 + ... + 16 s apart: within SLURM's default 30 s KillWait
REQUEUE_RETRY_S = 1.0
# SLURM's job states in which the job is already back in the queue: a requeue that raced another one is done
REQUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD")
# What sbatch says when it refuses a job (lower case, first match wins), and the launcher flags that set it
SBATCH_REFUSALS = (
    ("invalid partition", ("partition",)),
    ("invalid account", ("account", "partition")),
    ("invalid qos", ("qos", "partition")),
    ("invalid generic resource", ("ngpus",)),
    ("time limit", ("timeout", "partition")),
    ("invalid feature", ("constraint",)),
    ("node count", ("nodes",)),
    ("more processors requested than permitted", ("cpus_per_task", "tasks_per_node")),
    ("memory specification", ("mem_per_gpu",)),
    ("requested node configuration is not available", ("ngpus", "tasks_per_node", "cpus_per_task", "mem_per_gpu")),
)


def get_args_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix of one of the script's flags must reach the script, not match ours
    parser = argparse.ArgumentParser(
        "Submitit for DINO-MC",
        add_help=False,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-h", "--help", action="store_true", help="Show the launcher's and the script's flags.")
    parser.add_argument(
        "--script", default="main_dino_mc", choices=SCRIPTS, help="Script to run; its flags are passed through."
    )
    parser.add_argument(
        "--cluster",
        default="slurm",
        choices=["slurm", "local", "debug"],
        help="slurm: submit with sbatch; local: run the tasks as processes on this machine; "
        "debug: run in this Python process (one task).",
    )
    parser.add_argument("--nodes", default=1, type=int, help="Number of nodes to request.")
    parser.add_argument(
        "--ngpus",
        default=1,
        type=int,
        help="GPUs per node; one task runs per GPU. 0: request no GPU, run --tasks_per_node tasks on the CPUs "
        "(gloo). With --cluster local on a machine without a GPU, --ngpus N tasks run on the CPU too.",
    )
    parser.add_argument(
        "--tasks_per_node",
        default=None,
        type=int,
        help="Tasks per node of a CPU-only job (--ngpus 0); default 1. GPU jobs run one task per GPU.",
    )
    parser.add_argument("--timeout", default=2880, type=int, help="Time limit of the job in minutes.")
    parser.add_argument("--partition", default=None, type=str, help="SLURM partition.")
    parser.add_argument("--account", default=None, type=str, help="SLURM account to charge.")
    parser.add_argument("--qos", default=None, type=str, help="SLURM quality of service.")
    parser.add_argument("--constraint", default=None, type=str, help="SLURM node constraint, e.g. volta32gb.")
    parser.add_argument("--comment", default=None, type=str, help="Comment attached to the SLURM job.")
    parser.add_argument(
        "--mem_per_gpu", default=40, type=int, help="Host memory in GB per task, i.e. per GPU (--mem per node)."
    )
    parser.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per task (data loading workers).")
    parser.add_argument("--mail", default=None, type=str, help="E-mail address told when the job ends or fails.")
    parser.add_argument(
        "--signal_delay_s",
        default=120,
        type=int,
        help="Seconds between SLURM's SIGUSR2 and the kill: time to requeue and let a checkpoint write finish.",
    )
    parser.add_argument(
        "--max_timeouts",
        default=10,
        type=int,
        help="How many times a job that reaches --timeout is requeued (preemptions do not count).",
    )
    parser.add_argument(
        "--max_requeues",
        default=100,
        type=int,
        help="How many times a job is requeued in all, preemptions included, before it stops instead of looping.",
    )
    parser.add_argument(
        "--job_dir",
        default=None,
        type=str,
        help="Folder for submitit's logs; %%j is the job id. Default: output_dir/%%j.",
    )
    return parser


def load_script(name: str) -> ModuleType:
    """Import a script by name; a script that is not there is a configuration error, not a traceback."""
    if str(REPO_DIR) not in sys.path:  # the job's working directory need not be the repository
        sys.path.insert(0, str(REPO_DIR))
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        raise utils.ConfigError(f"--script {name}: there is no {name}.py in {REPO_DIR}") from None
    if not (hasattr(module, "get_args_parser") and hasattr(module, "main")):
        raise utils.ConfigError(f"--script {name}: {module.__file__} has no get_args_parser() and main(args)")
    return module


class Trainer:
    """The callable that submitit pickles and runs once per task.

    ``args`` are the script's parsed arguments; each run hands the script a copy, because the scripts write
    run-time state into their namespace (rank, device, resolved defaults) that must not leak into the
    requeued job. ``launch`` holds the launcher settings the job itself needs (GPUs or not, the limits);
    ``requeues`` counts the requeues so far, carried from one run to the next in the pickled Trainer.
    """

    def __init__(self, script: str, args: argparse.Namespace, launch: argparse.Namespace, requeues: int = 0):
        self.script = script
        self.args = args
        self.launch = launch
        self.requeues = requeues

    def __call__(self) -> None:
        module = load_script(self.script)
        if self.launch.ngpus == 0:
            # the job was given no GPU: without cgroups the node's GPUs are still visible, and not ours to use
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        job_env = submitit.JobEnvironment()
        if job_env.num_tasks > 1:
            # torchrun's variables, so that utils.init_distributed_mode takes its torchrun path; every task
            # keeps all of the node's GPUs and picks its own from LOCAL_RANK, as under torchrun
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # submitit's signal handler (installed before this call) requeues through this method
        submitit.slurm.slurm.SlurmJobEnvironment._requeue = requeue_slurm_job
        handle_requeue_signal(self)
        print(f"{self.script}: {job_env} (requeued {self.requeues} times so far)", flush=True)
        utils.run_main(module.main, copy.deepcopy(self.args))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 at timeout or preemption: the same run to requeue, or None to stop.

        Nothing needs saving here: the script's own atomic ``checkpoint.pth`` is what the requeued job resumes
        from. Past --max_requeues the job stops, so that a job preempted over and over does not loop forever.
        """
        if self.requeues >= self.launch.max_requeues:
            return None
        return submitit.helpers.DelayedSubmission(type(self)(self.script, self.args, self.launch, self.requeues + 1))

    def stop_message(self, reason: str) -> str:
        """The line a job prints when submitit does not requeue it (``reason`` is submitit's)."""
        if "timed-out" in reason:  # submitit: "timed-out too many times"
            limit = self.launch.max_timeouts
            why = f"it reached --timeout {self.launch.timeout} min more than --max_timeouts {limit} times"
        else:
            why = f"it was requeued {self.requeues} times already (--max_requeues {self.launch.max_requeues})"
        output_dir = getattr(self.args, "output_dir", None)
        kept = f" in {output_dir}" if output_dir else ""
        return f"{self.script}: job not requeued: {why}. Its last checkpoint{kept} is kept: submit again to continue"


def handle_requeue_signal(trainer: Trainer) -> None:
    """Wrap submitit's handler of the preemption signal: the task process only, and a one-line stop.

    SLURM signals every process of a job step, and forked DataLoader workers inherit submitit's handler: a
    rank-0 worker would checkpoint and requeue the job a second time and die, which makes the task fail with
    "DataLoader worker exited unexpectedly" instead of exiting for the requeue. When submitit declines to
    requeue (limits reached) it raises UncompletedJobError into the training loop, a traceback; instead the
    task says why in one line and exits with an error, which ends the job (srun --kill-on-bad-exit).
    """
    sig = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")
    submitit_handler = signal.getsignal(sig)
    if not callable(submitit_handler):  # debug executor: no handler installed
        return
    task_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != task_pid:
            return
        try:
            submitit_handler(signum, frame)
        except submitit.core.utils.UncompletedJobError as err:
            print(f"error: {trainer.stop_message(str(err))}", file=sys.stderr, flush=True)
            sys.exit(1)

    signal.signal(sig, handler)


def job_state(job_id: str) -> str:
    """SLURM's state of a job (PENDING, RUNNING, ...), or "" when scontrol cannot tell."""
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    fields = dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)
    return fields.get("JobState", "")


def requeue_job(job_id: str, countdown: int) -> None:
    """``scontrol requeue`` from inside the job, made to survive racing the job's own end.

    The requeue is asked while SLURM may already be ending the job (time limit reached, tasks exiting): the
    controller may be busy or answer "try again later", and a second requeue (another signal) gets "Job is
    pending execution". So: retried with a growing pause, and a job already back in the queue counts as
    requeued. If it cannot be requeued, one line says so and the task exits with an error.
    """
    error = ""
    for attempt in range(REQUEUE_ATTEMPTS):
        if attempt:
            time.sleep(REQUEUE_RETRY_S * 2 ** (attempt - 1))
        try:
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            requeued, error = done.returncode == 0, utils.one_line(RuntimeError(done.stderr or done.stdout))
        except (OSError, subprocess.TimeoutExpired) as err:
            requeued, error = False, str(err)
        if requeued or "pending execution" in error.lower() or job_state(job_id) in REQUEUED_STATES:
            print(f"Requeued job {job_id} ({countdown} remaining timeouts)", flush=True)
            return
    print(
        f"error: could not requeue job {job_id} after {REQUEUE_ATTEMPTS} tries (scontrol: {error}); submit the "
        "same command again to continue from its last checkpoint",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(1)


def requeue_slurm_job(env: submitit.slurm.slurm.SlurmJobEnvironment, countdown: int) -> None:
    """SlurmJobEnvironment._requeue for the job's tasks: submitit's single scontrol call, made robust."""
    requeue_job(env.job_id, countdown)


def tasks_per_node(args: argparse.Namespace) -> int:
    """One task per GPU; a CPU-only job runs --tasks_per_node tasks (default 1)."""
    return args.ngpus if args.ngpus else (args.tasks_per_node or 1)


def check_args(args: argparse.Namespace) -> None:
    """Reject launcher settings that cannot work, before anything is submitted (ConfigError, one line)."""
    for flag in ("nodes", "timeout", "cpus_per_task", "mem_per_gpu"):
        if getattr(args, flag) < 1:
            raise utils.ConfigError(f"--{flag} must be a positive number, got {getattr(args, flag)}")
    for flag in ("max_timeouts", "max_requeues"):
        if getattr(args, flag) < 0:
            raise utils.ConfigError(f"--{flag} must be 0 or more, got {getattr(args, flag)}")
    if args.ngpus < 0:
        raise utils.ConfigError(f"--ngpus must be 0 (CPU only) or a positive number, got {args.ngpus}")
    if args.tasks_per_node is not None:
        if args.tasks_per_node < 1:
            raise utils.ConfigError(f"--tasks_per_node must be a positive number, got {args.tasks_per_node}")
        if args.ngpus and args.tasks_per_node != args.ngpus:
            raise utils.ConfigError(
                f"--tasks_per_node {args.tasks_per_node}: a GPU job runs one task per GPU (--ngpus {args.ngpus}); "
                "use --ngpus 0 for CPU tasks"
            )
    if args.ngpus == 0 and getattr(args.script_args, "device", None) == "cuda":
        raise utils.ConfigError("--device cuda: a --ngpus 0 job gets no GPU; use --device auto or cpu, or --ngpus N")
    if args.cluster == "slurm" and shutil.which("srun") is None:
        raise utils.ConfigError("--cluster slurm: srun is not on PATH here; submit from a SLURM login node")
    if args.cluster != "slurm" and args.nodes != 1:
        raise utils.ConfigError(f"--cluster {args.cluster} runs on this machine only: use --nodes 1")
    if args.cluster == "debug" and tasks_per_node(args) != 1:
        raise utils.ConfigError("--cluster debug runs one task in this process: use --ngpus 1 or --cluster local")
    if args.job_dir is None and getattr(args.script_args, "output_dir", None) is None:
        raise utils.ConfigError(f"--job_dir is required: --script {args.script} has no --output_dir to put logs in")


def build_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    """An executor for ``args.cluster`` with one task per GPU (or CPU task); the slurm_* settings only reach
    sbatch, and a CPU-only job asks for no GPU at all (no --gpus-per-node line)."""
    job_dir = args.job_dir or str(Path(args.script_args.output_dir) / "%j")
    executor = submitit.AutoExecutor(
        folder=job_dir,
        cluster=args.cluster,
        slurm_max_num_timeout=args.max_timeouts,
        local_max_num_timeout=args.max_timeouts,
    )
    gpus_per_node = args.ngpus
    if args.cluster == "local" and not torch.cuda.is_available():
        gpus_per_node = 0  # the tasks run on the CPU and talk through gloo
    optional = {
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_comment": args.comment,
        "slurm_mail_user": args.mail,
        "slurm_mail_type": "END,FAIL" if args.mail else None,
        "slurm_signal_delay_s": args.signal_delay_s,
        # a task that exits with an error ends the job, instead of its peers waiting for it in a collective
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "gpus_per_node": gpus_per_node or None,
    }
    executor.update_parameters(
        name=args.script,
        nodes=args.nodes,
        tasks_per_node=tasks_per_node(args),
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_per_gpu * tasks_per_node(args),
        timeout_min=args.timeout,
        **{k: v for k, v in optional.items() if v is not None},
    )
    return executor


def sbatch_refusal(stderr: str, args: argparse.Namespace) -> str:
    """One line from sbatch's error output: its reasons, then the launcher flags (and values) that set them."""
    reasons: list[str] = []
    for line in stderr.splitlines():
        reason = line.strip().removeprefix("sbatch: error: ").removeprefix("Batch job submission failed: ")
        if reason and reason not in reasons:
            reasons.append(reason)
    cause = "; ".join(reasons) or "no message"
    for needle, flags in SBATCH_REFUSALS:
        if needle in cause.lower():
            # a GPU job's task count is --ngpus, a CPU job's is --tasks_per_node
            relevant = [f for f in flags if f != ("tasks_per_node" if args.ngpus else "ngpus")]
            values = {"tasks_per_node": tasks_per_node(args)}
            change = " or ".join(f"--{f} {values.get(f, getattr(args, f))}" for f in relevant)
            return f"sbatch refused the job: {cause}; change {change}"
    return f"sbatch failed: {cause}"


def submit(executor: submitit.AutoExecutor, trainer: Trainer, args: argparse.Namespace) -> submitit.Job:
    """Submit the job; sbatch's refusal becomes a ConfigError naming the cause and the flags to change.

    submitit echoes a failed sbatch's stderr before raising; that echo is held back (the error says it once)
    and shown only when the submission goes through.
    """
    echoed = io.StringIO()
    try:
        with contextlib.redirect_stderr(echoed):
            job = executor.submit(trainer)
    except submitit.core.utils.FailedJobError as err:
        raise utils.ConfigError(sbatch_refusal(str(err), args)) from None
    sys.stderr.write(echoed.getvalue())
    return job


def main(args: argparse.Namespace) -> submitit.Job:
    """Submit ``args.script`` with ``args.script_args``; with --cluster debug, run it here and now."""
    check_args(args)
    executor = build_executor(args)
    launch = argparse.Namespace(
        ngpus=args.ngpus, timeout=args.timeout, max_timeouts=args.max_timeouts, max_requeues=args.max_requeues
    )
    job = submit(executor, Trainer(args.script, args.script_args, launch), args)
    where = f"{args.ngpus} GPU(s)" if args.ngpus else "CPUs"
    print(
        f"Submitted job {job.job_id}: {args.script} on {args.nodes} node(s) x {tasks_per_node(args)} task(s), {where}."
    )
    print(f"Logs: {job.paths.stdout.parent}")
    if args.cluster == "debug":
        job.results()
    return job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The launcher's flags, with the script's own flags parsed by its parser into ``args.script_args``."""
    launcher_parser = get_args_parser()
    args, rest = launcher_parser.parse_known_args(argv)
    try:
        module = load_script(args.script)
    except utils.ConfigError as err:
        utils.fail(str(err))
    script_parser = argparse.ArgumentParser(
        f"run_with_submitit.py --script {args.script}",
        parents=[module.get_args_parser()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if args.help:
        launcher_parser.print_help()
        print()
        script_parser.print_help()
        sys.exit(0)
    args.script_args = script_parser.parse_args(rest)
    return args


def run(argv: list[str] | None = None) -> submitit.Job:
    """Command-line entry: bad launcher settings are reported as one line with exit code 2."""
    args = parse_args(argv)
    try:
        return main(args)
    except utils.ConfigError as err:
        utils.fail(str(err))


if __name__ == "__main__":
    run()
