"""The ``beamlora`` command: ``beamlora train`` on the embedded default or your own model and data."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from beamlora.config import ABLATIONS, MAX_SEED
from beamlora.train import TrainConfig
from rankscope.cli import run
from rankscope.errors import RankscopeError
from rankscope.tasks.runconfig import TASK_DEFAULTS, TASKS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rankscope")
def cli() -> None:
    """Train LoRA adapters with BeamLoRA (learnable rank scores, prune and expand every Δt steps).

    Start with `beamlora train`: MiniLM on Rotten Tomatoes, offline, in a few minutes on a CPU.
    """


DEFAULTS = TrainConfig()
_CLS, _SFT = TASK_DEFAULTS["classification"], TASK_DEFAULTS["sft"]


def _task_default(name: str) -> str:
    """Help text for an option whose default depends on --task."""
    return f"[default: {_CLS[name]}; --task sft: {_SFT[name]}]"


@cli.command()
@click.option("--task", type=click.Choice(list(TASKS)), default=DEFAULTS.task, show_default=True,
              help="classification (a label per text) or sft (instruction tuning of a causal LM: loss on the "
                   "response, exact match of the final answer).")
@click.option("--model", help="minilm (sequence classification), smollm2 (causal LM), a local folder or a hub id "
                              "(owner/name, where there is network). " + _task_default("model"))
@click.option("--data", help="classification: rotten-tomatoes or a .csv/.jsonl with text and label columns; sft: "
                             "arithmetic (built in) or a .jsonl of {\"prompt\", \"response\"} or {\"messages\": [...]} "
                             "lines. " + _task_default("data"))
@click.option("--method", type=click.Choice(["lora", "beamlora"]), default=DEFAULTS.method, show_default=True)
@click.option("--rank", type=click.IntRange(min=1), help="LoRA rank r. " + _task_default("rank"))
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True),
              help="LoRA alpha (scale alpha / r). " + _task_default("alpha"))
@click.option("--targets", help="Comma-separated LoRA target modules (default: the model's attention projections).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps. " + _task_default("steps"))
@click.option("--batch-size", type=click.IntRange(min=1),
              help="The global batch: under torchrun / accelerate launch each of N processes takes batch / N. "
                   + _task_default("batch_size"))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="AdamW learning rate (linear decay). " + _task_default("lr"))
@click.option("--max-length", type=click.IntRange(min=8),
              help="Tokens per training sequence; sft: an over-long prompt loses its start. " + _task_default("max_length"))
@click.option("--p-init", type=click.FloatRange(0, 1, min_open=True), default=DEFAULTS.p_init, show_default=True,
              help="BeamLoRA: top-p threshold at the first operation.")
@click.option("--delta-t", type=click.IntRange(min=2), help="BeamLoRA: steps between operations. " + _task_default("delta_t"))
@click.option("--ablation", type=click.Choice(ABLATIONS), default=DEFAULTS.ablation, show_default=True,
              help="BeamLoRA: the paper's Table 3 controls. no-expansion: prune only (pruned ranks zeroed for good); "
                   "random: as many ranks as the top-p cut, chosen (and their sources) at random, seeded; "
                   "fixed-p: p stays at p_init until end_step.")
@click.option("--snapshot-every", type=click.IntRange(min=0), default=DEFAULTS.snapshot_every, show_default=True,
              help="Write RUN_DIR/step-NNNNNN/ every N steps (0: none).")
@click.option("--trace-every", type=click.IntRange(min=0), default=DEFAULTS.trace_every, show_default=True,
              help="Append per-rank importances and spectra to RUN_DIR/rank_trace.jsonl every N steps (0: none).")
@click.option("--eval-every", type=click.IntRange(min=0), default=DEFAULTS.eval_every, show_default=True,
              help="Held-out evaluation every N steps (always at the end; sft also before training).")
@click.option("--held-out", type=click.IntRange(min=1),
              help="Examples kept out of training (fixed, seeded split). " + _task_default("held_out"))
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help=f"Seed of the split, the initialisation, the data order and the random ablation (0 … {MAX_SEED}).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=DEFAULTS.out, show_default=True,
              help="Run folder: snapshots, events.jsonl, metrics.jsonl, config.json, final/.")
@click.option("--checkpoint-every", type=click.IntRange(min=0),
              help="Steps between the checkpoints --resume continues from (default: at each snapshot; 0: none).")
@click.option("--overwrite", is_flag=True,
              help="Replace the beamlora run in RUN_DIR, once the new run has finished (a failed or killed rerun "
                   "leaves the old one as it was). A folder that holds no beamlora run is refused, never deleted.")
@click.option("--resume", is_flag=True,
              help="Continue the killed run in RUN_DIR from its last complete checkpoint (the same options).")
@click.option("--fsdp", is_flag=True,
              help="Shard the model, the LoRA parameters and the BeamLoRA scores with FSDP2 (fully_shard) across the "
                   "processes of torchrun --nproc-per-node N -m beamlora train ... or accelerate launch; without it "
                   "such a launch trains with DDP.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def train(task: str, model: str | None, data: str | None, method: str, rank: int | None, alpha: float | None,
          targets: str | None, steps: int | None, batch_size: int | None, lr: float | None, max_length: int | None,
          p_init: float, delta_t: int | None, ablation: str, snapshot_every: int, trace_every: int, eval_every: int,
          held_out: int | None, seed: int, out: Path, checkpoint_every: int | None, overwrite: bool, resume: bool,
          fsdp: bool, progress: bool) -> None:
    """Train a LoRA or BeamLoRA adapter and report held-out accuracy (sft: loss and exact match).

    With no options: MiniLM (all-MiniLM-L6-v2) sequence classification on Rotten Tomatoes
    critic snippets, r=16 on query/key/value/attention output, 300 steps of batch 16, BeamLoRA
    with p_init 0.95 and Δt 50. `--task sft`: SmolLM2-135M-Instruct on generated arithmetic word
    problems (GSM8K answer format), exact match before and after. The run folder then reads with
    `rankscope analyze RUN_DIR`.
    """
    # imported on use: torch, peft and transformers load only when training starts
    from beamlora.train import train as run_training

    config = TrainConfig(task=task, model=model, data=data, method=method, rank=rank, alpha=alpha,
                         targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
                         steps=steps, batch_size=batch_size, lr=lr, max_length=max_length, p_init=p_init,
                         delta_t=delta_t, ablation=ablation, snapshot_every=snapshot_every or None, eval_every=eval_every or None,
                         held_out=held_out, trace_every=trace_every or None, seed=seed, out=str(out),
                         checkpoint_every=checkpoint_every, fsdp=fsdp)
    result = run_training(config, overwrite=overwrite, progress=progress, resume=resume)
    from beamlora import distributed

    if not distributed.is_main():
        return  # rank 0 reports the run
    events = f", {result.events} BeamLoRA events" if method == "beamlora" else ""
    if ablation != "none":
        events += f" (ablation {ablation})"
    if config.task == "sft":
        click.echo(f"{method} sft on {config.model} / {config.data}: {_sft_summary(result.metrics)}{events}")
    else:
        click.echo(f"{method} on {config.model} / {config.data}: held-out accuracy {result.accuracy:.4f} "
                   f"(majority class {result.majority_rate:.4f}){events}")
    click.echo(f"  run folder     {result.run_dir}   (rankscope analyze {result.run_dir} --out {result.run_dir}/report)")


def _sft_summary(metrics: list[dict]) -> str:
    """"held-out exact match 0.62 (untuned 0.08), loss 0.31 (untuned 1.20)"."""
    first, last = metrics[0], metrics[-1]
    parts = []
    for key, words in (("exact_match", "held-out exact match"), ("loss", "loss")):
        if last.get(key) is None:
            continue
        text = f"{words} {last[key]:.4f}"
        if first is not last and first.get("step") == 0 and first.get(key) is not None:
            text += f" (untuned {first[key]:.4f})"
        parts.append(text)
    return ", ".join(parts) or "no held-out metric"


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``beamlora``: bad input ends in one ``Error:`` line and exit status 2."""
    import warnings


    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's business
    # SIGTERM (what schedulers send) ends like Ctrl-C: one line; during training it first writes a checkpoint.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run(cli, "beamlora", argv, (RankscopeError,))  # BeamLoraError is one


if __name__ == "__main__":
    main()
