"""File names and schema ids, in one place: what both packages write and read in run and adapter folders.

beamlora writes these files and rankscope reads them; neither spells a name out elsewhere.
"""

# ----------------------------------------------------------------------------- an adapter folder
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's LoraConfig beside the weights
TRAINER_STATE = "trainer_state.json"  # the HF Trainer's state in a checkpoint-N folder
SCORES_FILE = "beamlora_scores.safetensors"  # BeamLoRA's raw rank scores, beside a snapshot's adapter
# Adapter weight files by the name each tool gives them, most specific first.
ADAPTER_WEIGHT_NAMES = (
    "adapter_model.safetensors", "adapters.safetensors", "pytorch_lora_weights.safetensors",
    "adapter_model.bin", "adapter_model.pt", "pytorch_lora_weights.bin",
)

# ----------------------------------------------------------------------------- every folder this project writes
MANIFEST_FILE = ".rankscope-manifest.json"  # what kind of output, and its files: only such a folder is replaced

# ----------------------------------------------------------------------------- a run folder (beamlora train)
RUN_CONFIG = "config.json"  # the resolved TrainConfig, enough to rerun
METRICS_FILE = "metrics.jsonl"  # held-out metrics at each evaluation
EVENTS_FILE = "events.jsonl"  # one line per BeamLoRA operation
TRACE_FILE = "rank_trace.jsonl"  # rank telemetry, one record per traced step
STATE_FILE = "beamlora_state.pt"  # the BeamLoRA controller's state inside a checkpoint
GENERATIONS_FILE = "generations.jsonl"  # sft: the held-out generations at the end
# Files in training folders that are tensors but never adapters.
NOT_ADAPTER_FILES = frozenset({
    SCORES_FILE, "optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth", "scaler.pt", STATE_FILE,
})

# ----------------------------------------------------------------------------- JSON documents
ANALYSIS_SCHEMA = "rankscope/analysis-v1"
COMPARE_SCHEMA = "rankscope/compare-v1"
SWEEP_SCHEMA = "rankscope/sweep-v1"
SUGGEST_SCHEMA = "rankscope/suggest-v1"
RESIZE_SCHEMA = "rankscope/resize-v1"
RECOMMEND_SCHEMA = "rankscope/recommend-v1"
DYNAMICS_SCHEMA = "rankscope/dynamics-v1"
TRACE_SCHEMA = "rankscope/trace-v1"
