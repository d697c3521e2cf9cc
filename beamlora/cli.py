"""The ``beamlora`` command: ``beamlora train`` on the embedded default or your own model and data."""

from __future__ import annotations

from pathlib import Path

import click

from .config import ABLATIONS, MAX_SEED
from .errors import BeamLoraError
from .train import TrainConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rankscope")
def cli() -> None:
    """Train LoRA adapters with BeamLoRA (learnable rank scores, prune and expand every Δt steps).

    Start with `beamlora train`: MiniLM on Rotten Tomatoes, offline, in a few minutes on a CPU.
    """


DEFAULTS = TrainConfig()


@cli.command()
@click.option("--model", default=DEFAULTS.model, show_default=True,
              help="minilm (sequence classification), smollm2 (causal LM, label word as target) or a local folder.")
@click.option("--data", default=DEFAULTS.data, show_default=True,
              help="rotten-tomatoes or a .csv/.jsonl file with text and label columns.")
@click.option("--method", type=click.Choice(["lora", "beamlora"]), default=DEFAULTS.method, show_default=True)
@click.option("--rank", type=click.IntRange(min=1), default=DEFAULTS.rank, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.alpha, show_default=True,
              help="LoRA alpha (scale alpha / r).")
@click.option("--targets", help="Comma-separated LoRA target modules (default: the model's attention projections).")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULTS.steps, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr, show_default=True,
              help="AdamW learning rate (linear decay).")
@click.option("--p-init", type=click.FloatRange(0, 1, min_open=True), default=DEFAULTS.p_init, show_default=True,
              help="BeamLoRA: top-p threshold at the first operation.")
@click.option("--delta-t", type=click.IntRange(min=2), default=DEFAULTS.delta_t, show_default=True,
              help="BeamLoRA: steps between operations.")
@click.option("--ablation", type=click.Choice(ABLATIONS), default=DEFAULTS.ablation, show_default=True,
              help="BeamLoRA: the paper's Table 3 controls. no-expansion: prune only (pruned ranks zeroed for good); "
                   "random: as many ranks as the top-p cut, chosen (and their sources) at random, seeded; "
                   "fixed-p: p stays at p_init until end_step.")
@click.option("--snapshot-every", type=click.IntRange(min=0), default=DEFAULTS.snapshot_every, show_default=True,
              help="Write RUN_DIR/step-NNNNNN/ every N steps (0: none).")
@click.option("--trace-every", type=click.IntRange(min=0), default=DEFAULTS.trace_every, show_default=True,
              help="Append per-rank importances and spectra to RUN_DIR/rank_trace.jsonl every N steps (0: none).")
@click.option("--eval-every", type=click.IntRange(min=0), default=DEFAULTS.eval_every, show_default=True,
              help="Held-out evaluation every N steps (always at the end).")
@click.option("--held-out", type=click.IntRange(min=1), default=DEFAULTS.held_out, show_default=True,
              help="Examples kept out of training (fixed, seeded split).")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help=f"Seed of the split, the initialisation, the data order and the random ablation (0 … {MAX_SEED}).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=DEFAULTS.out, show_default=True,
              help="Run folder: snapshots, events.jsonl, metrics.jsonl, config.json, final/.")
@click.option("--overwrite", is_flag=True, help="Replace RUN_DIR if it exists.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def train(model: str, data: str, method: str, rank: int, alpha: float, targets: str | None, steps: int, batch_size: int,
          lr: float, p_init: float, delta_t: int, ablation: str, snapshot_every: int, trace_every: int,
          eval_every: int, held_out: int, seed: int, out: Path, overwrite: bool, progress: bool) -> None:
    """Train a LoRA or BeamLoRA adapter and report held-out accuracy.

    With no options: MiniLM (all-MiniLM-L6-v2) sequence classification on Rotten Tomatoes
    critic snippets, r=16 on query/key/value/attention output, 300 steps of batch 16, BeamLoRA
    with p_init 0.95 and Δt 50. The run folder then reads with `rankscope analyze RUN_DIR`.
    """
    from .train import train as run_training

    config = TrainConfig(model=model, data=data, method=method, rank=rank, alpha=alpha,
                         targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None,
                         steps=steps, batch_size=batch_size, lr=lr, p_init=p_init, delta_t=delta_t, ablation=ablation,
                         snapshot_every=snapshot_every or None, eval_every=eval_every or None, held_out=held_out,
                         trace_every=trace_every or None,
                         seed=seed, out=str(out))
    result = run_training(config, overwrite=overwrite, progress=progress)
    events = f", {result.events} BeamLoRA events" if method == "beamlora" else ""
    if ablation != "none":
        events += f" (ablation {ablation})"
    click.echo(f"{method} on {model} / {data}: held-out accuracy {result.accuracy:.4f} "
               f"(majority class {result.majority_rate:.4f}){events}")
    click.echo(f"  run folder     {result.run_dir}   (rankscope analyze {result.run_dir} --out {result.run_dir}/report)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``beamlora``: bad input ends in one ``Error:`` line and exit status 2."""
    import warnings

    from rankscope.cli import run
    from rankscope.errors import RankscopeError

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's business
    run(cli, "beamlora", argv, (BeamLoraError, RankscopeError))


if __name__ == "__main__":
    main()
