"""Submit pretraining, evaluation or fine-tuning to SLURM with submitit, on one or many nodes.

    python run_with_submitit.py --nodes 2 --ngpus 4 --partition gpu --timeout 2880 \\
        --arch vit_small --data_mode mc --data_path /data/seasonal_contrast_100k --output_dir runs/mc
    python run_with_submitit.py --script eval_linear --ngpus 1 --partition gpu ... (eval_linear's own flags)
    python run_with_submitit.py --cluster local --ngpus 2 ...   (same code path on this machine)

The launcher's flags are read first; every other flag goes to the chosen script's parser, here on the login
node, so that a typo fails before the job waits in the queue. Each job runs one task per GPU; each task
exports torchrun's variables (master address from the node list, rank, local rank, world size) from the job
environment, so the script's ``utils.init_distributed_mode`` sets up torch.distributed on the same path as
under torchrun.

Timeout and preemption: SLURM sends SIGUSR2 ``--signal_delay_s`` seconds before it kills the job; submitit
then calls ``Trainer.checkpoint`` on rank 0 and requeues the job with the same arguments. The scripts save
``output_dir/checkpoint.pth`` atomically at the end of every epoch and resume from it on start, so the
requeued job (and any later resubmission with the same ``--output_dir``) continues from the last finished
epoch.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import shutil
import signal
import sys
from pathlib import Path
from types import ModuleType

import submitit
import torch

import utils

REPO_DIR = Path(__file__).resolve().parent
SCRIPTS = ("main_dino_mc", "eval_knn", "eval_linear", "finetune_eurosat", "finetune_bigearthnet", "finetune_oscd")


def get_args_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix of one of the script's flags must reach the script, not match ours
    parser = argparse.ArgumentParser("Submitit for DINO-MC", add_help=False, allow_abbrev=False)
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
        help="GPUs per node; one task runs per GPU. With --cluster local on a machine without a GPU, this many "
        "tasks run on the CPU (gloo).",
    )
    parser.add_argument("--timeout", default=2880, type=int, help="Time limit of the job in minutes.")
    parser.add_argument("--partition", default=None, type=str, help="SLURM partition.")
    parser.add_argument("--account", default=None, type=str, help="SLURM account to charge.")
    parser.add_argument("--qos", default=None, type=str, help="SLURM quality of service.")
    parser.add_argument("--constraint", default=None, type=str, help="SLURM node constraint, e.g. volta32gb.")
    parser.add_argument("--comment", default=None, type=str, help="Comment attached to the SLURM job.")
    parser.add_argument("--mem_per_gpu", default=40, type=int, help="Host memory in GB per GPU (--mem per node).")
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
    requeued job.
    """

    def __init__(self, script: str, args: argparse.Namespace):
        self.script = script
        self.args = args

    def __call__(self) -> None:
        module = load_script(self.script)
        job_env = submitit.JobEnvironment()
        if job_env.num_tasks > 1:
            # torchrun's variables, so that utils.init_distributed_mode takes its torchrun path; every task
            # keeps all of the node's GPUs and picks its own from LOCAL_RANK, as under torchrun
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        handle_requeue_signal_in_task_only()
        print(f"{self.script}: {job_env}", flush=True)
        module.main(copy.deepcopy(self.args))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 at timeout or preemption: requeue the same run.

        Nothing needs saving here: the script's own atomic ``checkpoint.pth`` of the last finished epoch is
        what the requeued job resumes from.
        """
        print(f"{self.script}: requeuing with the same arguments; the job resumes from its last checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.script, self.args))


def handle_requeue_signal_in_task_only() -> None:
    """Let only the task process itself act on the preemption signal, not its DataLoader workers.

    SLURM signals every process of a job step, and forked workers inherit submitit's handler: a rank-0
    worker would checkpoint and requeue the job a second time and die, which makes the task fail with
    "DataLoader worker exited unexpectedly" instead of exiting for the requeue.
    """
    sig = getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")
    submitit_handler = signal.getsignal(sig)
    if not callable(submitit_handler):  # debug executor: no handler installed
        return
    task_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() == task_pid:
            submitit_handler(signum, frame)

    signal.signal(sig, handler)


def check_args(args: argparse.Namespace) -> None:
    """Reject launcher settings that cannot work, before anything is submitted (ConfigError, one line)."""
    for flag in ("nodes", "ngpus", "timeout", "cpus_per_task"):
        if getattr(args, flag) < 1:
            raise utils.ConfigError(f"--{flag} must be a positive number, got {getattr(args, flag)}")
    if args.cluster == "slurm" and shutil.which("srun") is None:
        raise utils.ConfigError("--cluster slurm: srun is not on PATH here; submit from a SLURM login node")
    if args.cluster != "slurm" and args.nodes != 1:
        raise utils.ConfigError(f"--cluster {args.cluster} runs on this machine only: use --nodes 1")
    if args.cluster == "debug" and args.ngpus != 1:
        raise utils.ConfigError("--cluster debug runs one task in this process: use --ngpus 1 or --cluster local")
    if args.job_dir is None and getattr(args.script_args, "output_dir", None) is None:
        raise utils.ConfigError(f"--job_dir is required: --script {args.script} has no --output_dir to put logs in")


def build_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    """An executor for ``args.cluster`` with one task per GPU; the slurm_* settings only reach sbatch."""
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
    slurm = {
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_comment": args.comment,
        "slurm_mail_user": args.mail,
        "slurm_mail_type": "END,FAIL" if args.mail else None,
        "slurm_signal_delay_s": args.signal_delay_s,
    }
    executor.update_parameters(
        name=args.script,
        nodes=args.nodes,
        tasks_per_node=args.ngpus,
        gpus_per_node=gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_per_gpu * args.ngpus,
        timeout_min=args.timeout,
        **{k: v for k, v in slurm.items() if v is not None},
    )
    return executor


def main(args: argparse.Namespace) -> submitit.Job:
    """Submit ``args.script`` with ``args.script_args``; with --cluster debug, run it here and now."""
    check_args(args)
    executor = build_executor(args)
    job = executor.submit(Trainer(args.script, args.script_args))
    print(f"Submitted job {job.job_id}: {args.script} on {args.nodes} node(s) x {args.ngpus} task(s).")
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
        f"run_with_submitit.py --script {args.script}", parents=[module.get_args_parser()]
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
