"""Hugging Face Hub ids where a path is taken, offline, against a Hub cache folder built in huggingface_hub's own
layout and read by huggingface_hub itself (no mocks): by id, @revision, --revision, subfolder, a local path that
wins, an id that is not cached, a repo without an adapter, and which files an adapter or a model needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.adapters import adapter_arrays, write_adapter
from helpers.cli import REPO, assert_one_error_line, run_cli
from helpers.fake_hub import FakeHub
from helpers.hub_cache import add_commit, folder_files

from rankscope.errors import RankscopeError
from rankscope.io.hub import HubSpec, adapter_files, model_files, parse_spec

ADAPTER = "alice/lora-demo"
BASE = "bob/base-model"
BASE_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding ADAPTER (main: adapter A at the root, adapter B in sub/inner, a base model's weights beside
    them; tag v2: adapter C alone) and BASE (a model, no adapter); the local folders A, B, C; and the env to use it."""
    root = tmp_path_factory.mktemp("hub")
    local = {name: write_adapter(root / "local" / name, adapter_arrays(decay, seed))
             for name, decay, seed in (("A", 0.6, 1), ("B", 0.9, 2), ("C", 0.75, 3))}
    cache = root / "cache"
    main = add_commit(cache, ADAPTER, {**folder_files(local["A"]), **folder_files(local["B"], "sub/inner/"),
                                       "config.json": b"{}", "model.safetensors": local["C"] / "adapter_model.safetensors",
                                       "README.md": b"# demo"})
    v2 = add_commit(cache, ADAPTER, folder_files(local["C"]), refs=("v2",))
    base = add_commit(cache, BASE, {"config.json": json.dumps(BASE_CONFIG).encode(),
                             "model.safetensors": local["A"] / "adapter_model.safetensors"})
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "hf-home"), "HF_HUB_OFFLINE": "1"}
    return {"root": root, "cache": cache, "local": local, "main": main, "v2": v2, "base": base, "env": env}


def _strip(value):
    """A JSON document without the paths it was read from (a cache folder or a local one)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("path", "final")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _analysis(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return _strip(json.loads(result.stdout))


# In one interpreter (each start costs a second): the Python API on ids and on the local folders, and the base-model
# resolution that sweep --model and beamlora train --model use.
_API_SCRIPT = """
import json, sys
import rankscope
from rankscope.errors import RankscopeError
from rankscope.io.documents import to_json
from rankscope.maths.suggest import suggest
from rankscope.tasks import models
adapter, base, local, v2 = sys.argv[1:5]
def analysis(spec, revision=None):
    return json.loads(to_json(rankscope.analyze(rankscope.io.hub.resolve_local(spec, revision))))
def error(spec):
    try:
        rankscope.load(spec)
    except RankscopeError as e:
        return str(e)
out = {name: analysis(f"{local}/{name}") for name in "ABC"}
out.update({spec: analysis(spec) for spec in (adapter, adapter + "@v2", adapter + "@" + v2, adapter + "/sub/inner",
                                              adapter + "/sub/inner/adapter_model.safetensors")})
out["revision v2"] = analysis(adapter, "v2")
out["load"] = [str(rankscope.load(adapter, revision="v2").path), str(rankscope.discover(adapter + "/sub/inner").weights)]
out["suggest C"] = json.loads(to_json(suggest(f"{local}/C")))["modules"]
out["model"] = str(models.model_path(base))
out["head"] = models.head_of(base)  # sweep --model and beamlora train --model: a causal LM, read from the cached config
out["is_hub_id"] = [models.is_hub_id(base + "@main/x"), models.is_hub_id(local)]
out["errors"] = [error(adapter + "@no-such-tag"), error(adapter + "/sub")]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def api(hub):
    result = subprocess.run([sys.executable, "-c", _API_SCRIPT, ADAPTER, BASE, str(hub["root"] / "local"), hub["v2"]],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, **hub["env"], "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    return {k: _strip(v) for k, v in json.loads(result.stdout).items()}


def test_the_api_reads_ids_revisions_and_subfolders_as_the_local_folders(hub, api):
    A, B, C = api["A"], api["B"], api["C"]
    assert A != B and B != C and A != C  # three different adapters: a mix-up would show
    assert api[ADAPTER] == A and api[f"{ADAPTER}/sub/inner"] == B
    assert api[f"{ADAPTER}/sub/inner/adapter_model.safetensors"] == B
    assert api[f"{ADAPTER}@v2"] == C and api[f"{ADAPTER}@{hub['v2']}"] == C and api["revision v2"] == C
    snapshots = hub["cache"] / "models--alice--lora-demo" / "snapshots"
    assert api["load"] == [str(snapshots / hub["v2"] / "adapter_model.safetensors"),
                           str(snapshots / hub["main"] / "sub" / "inner" / "adapter_model.safetensors")]
    assert Path(api["model"], "config.json").read_text() == json.dumps(BASE_CONFIG)
    assert api["model"] == str(hub["cache"] / "models--bob--base-model" / "snapshots" / hub["base"])
    assert api["head"] == "causal" and api["is_hub_id"] == [True, False]
    not_cached, no_adapter = api["errors"]
    assert "alice/lora-demo@no-such-tag" in not_cached and "not in the Hugging Face cache" in not_cached
    assert "holds no LoRA adapter at 'sub' (inner/)" in no_adapter


def test_commands_take_ids_and_give_the_local_folders_numbers(hub, api, tmp_path):
    env = hub["env"]
    by_id = run_cli("analyze", ADAPTER, "--json", "-", env=env)
    assert _analysis(by_id) == api["A"]
    assert json.loads(by_id.stdout)["path"] == str(hub["cache"] / "models--alice--lora-demo" / "snapshots" / hub["main"])
    assert _analysis(run_cli("analyze", ADAPTER, "--revision", "v2", "--json", "-", env=env)) == api["C"]
    suggested = run_cli("suggest", f"{ADAPTER}@v2", "--json", "-", env=env)
    assert suggested.returncode == 0, suggested.stderr
    assert _strip(json.loads(suggested.stdout)["modules"]) == api["suggest C"]
    compared = run_cli("compare", ADAPTER, f"{ADAPTER}/sub/inner", "--json", "-", env=env)
    assert compared.returncode == 0, compared.stderr
    assert [run["label"] for run in json.loads(compared.stdout)["runs"]] == ["lora-demo", "inner"]  # as typed
    out = tmp_path / "resized"
    resized = run_cli("resize", f"{ADAPTER}/sub/inner", "--rank", "2", "--out", out, env=env)
    assert resized.returncode == 0, resized.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_a_local_path_wins_over_an_id_of_the_same_spelling(hub, api, tmp_path):
    write_adapter(tmp_path / "alice" / "lora-demo", adapter_arrays(0.75, 3))  # = C, while the cached main is A
    result = run_cli("analyze", ADAPTER, "--json", "-", cwd=tmp_path, env=hub["env"])
    assert json.loads(result.stdout)["path"] == ADAPTER
    assert _analysis(result) == api["C"]


def test_bad_ids_are_one_error_line_and_write_nothing(hub, tmp_path):
    env = hub["env"]
    out = tmp_path / "out"
    line = assert_one_error_line(run_cli("resize", "carol/not-cached", "--rank", "2", "--out", out, env=env),
                           "carol/not-cached", "not in the Hugging Face cache", str(hub["cache"]), "HF_HUB_OFFLINE=1",
                           "run once online, or pass a local folder")
    assert "does not exist here" in line and not out.exists()
    assert_one_error_line(run_cli("analyze", BASE, "--out", out, env=env), "bob/base-model holds no LoRA adapter at its root",
                    "config.json, model.safetensors")
    assert not out.exists()
    # a survey goes on past an id it cannot fetch, as past any unreadable adapter
    survey = run_cli("analyze", ADAPTER, "carol/not-cached", "--table", "-", env=env)
    assert survey.returncode == 0, survey.stderr
    assert "not in the Hugging Face cache" in survey.stdout and "2 adapters, 1 analysed, 1 with an error" in survey.stderr


# ----------------------------------------------------------------------------- online, against a stand-in Hub

_ONLINE_SCRIPT = """
import json
from rankscope.errors import RankscopeError
from rankscope.io.hub import resolve_local
from rankscope.tasks import models
def error(spec):
    try:
        resolve_local(spec)
    except RankscopeError as e:
        return str(e)
print(json.dumps([str(models.model_path("bob/model")), error("zed/none"), error("alice/online@nope/lora"),
                  error("alice/online")]))
"""


def test_online_only_the_adapters_files_are_fetched_then_read_offline(tmp_path):
    local = write_adapter(tmp_path / "A", adapter_arrays(0.6, 1))
    step = write_adapter(tmp_path / "B", adapter_arrays(0.9, 2))
    weights, config = (local / "adapter_model.safetensors").read_bytes(), (local / "adapter_config.json").read_bytes()
    state = json.dumps({"global_step": 100, "log_history": []}).encode()
    adapter_repo = {"README.md": b"# demo", "config.json": b"{}", "model.safetensors": b"base weights " * 100,
                    "lora/adapter_config.json": config, "lora/adapter_model.safetensors": weights,
                    "lora/optimizer.pt": b"optimizer state", "lora/checkpoint-100/adapter_config.json": config,
                    "lora/checkpoint-100/adapter_model.safetensors": (step / "adapter_model.safetensors").read_bytes(),
                    "lora/checkpoint-100/trainer_state.json": state, "lora/checkpoint-100/optimizer.pt": b"opt"}
    model_repo = {name: name.encode() for name in ("config.json", "tokenizer.json", "model.safetensors", "pytorch_model.bin",
                                                   "model-Q4_K_M.gguf", "onnx/model.onnx", "original/consolidated.00.pth")}
    fake = FakeHub({"alice/online": {"commit": "a" * 40, "files": adapter_repo},
                    "bob/model": {"commit": "b" * 40, "files": model_repo}})
    cache = tmp_path / "cache"
    env = {"HF_ENDPOINT": fake.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "HF_TOKEN": "hf_stand_in_token", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    try:
        online = run_cli("analyze", "alice/online/lora", "--json", "-", env=env)
        assert online.returncode == 0, online.stderr
        wanted = sorted(p for p in adapter_repo if p.startswith("lora/") and "optimizer" not in p)
        snapshot = cache / "models--alice--online" / "snapshots" / ("a" * 40)
        assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == wanted
        # a blob already fetched (the two identical adapter_config.json) is not sent twice; nothing else is sent
        assert set(fake.downloaded) <= {"alice/online/" + p for p in wanted} and "alice/online/" + wanted[-1] in fake.downloaded
        assert fake.authorization == {"Bearer hf_stand_in_token"}
        result = subprocess.run([sys.executable, "-c", _ONLINE_SCRIPT], capture_output=True, text=True, timeout=120,
                                env={**os.environ, **env, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        model, no_repo, no_revision, no_adapter = json.loads(result.stdout)
    finally:
        fake.close()
    assert model == str(cache / "models--bob--model" / "snapshots" / ("b" * 40))
    assert sorted(p for p in fake.downloaded if p.startswith("bob/")) == [
        "bob/model/config.json", "bob/model/model.safetensors", "bob/model/tokenizer.json"]
    assert "zed/none does not exist here" in no_repo and "is not on the Hugging Face Hub" in no_repo
    assert "alice/online has no revision 'nope'" in no_revision
    assert "alice/online holds no LoRA adapter at its root (README.md, config.json, lora/, model.safetensors)" in no_adapter
    document = json.loads(online.stdout)
    assert document["layout"] == "hf-trainer" and [s["step"] for s in document["snapshots"]] == [100]

    offline = run_cli("analyze", "alice/online/lora", "--json", "-", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout) == document  # the same files, now from the cache alone


# ----------------------------------------------------------------------------- which files are fetched

# A realistic repo: a base model (sharded safetensors, .bin twins, ONNX, GGUF quants, original/ weights), an adapter
# in a subfolder with a Trainer run's checkpoints beside it, and a kohya LoRA with its per-epoch files.
LISTING = [
    ".gitattributes", "README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
    "onnx/model.onnx", "original/consolidated.00.pth", "qwen-7b-Q4_K_M.gguf", "qwen-7b-F16-LoRA.gguf",
    "lora/adapter_config.json", "lora/adapter_model.safetensors", "lora/adapter_model.bin", "lora/README.md",
    "lora/optimizer.pt", "lora/training_args.bin",
    "lora/checkpoint-100/adapter_config.json", "lora/checkpoint-100/adapter_model.safetensors",
    "lora/checkpoint-100/optimizer.pt", "lora/checkpoint-100/rng_state.pth", "lora/checkpoint-100/scheduler.pt",
    "lora/checkpoint-100/trainer_state.json", "lora/checkpoint-100/training_args.bin",
    "lora/checkpoint-100/tokenizer.json", "lora/runs/events.out.tfevents",
    "kohya/my_style.safetensors", "kohya/my_style-000004.safetensors", "kohya/sample/img.png",
    "unet/diffusion_pytorch_model.safetensors",
    "mlx/adapter_config.json", "mlx/adapters.safetensors", "mlx/0000100_adapters.safetensors",
]


def test_adapter_files_never_include_a_base_models_weights():
    assert adapter_files(LISTING, "lora") == [
        "lora/adapter_model.safetensors", "lora/adapter_config.json",
        "lora/checkpoint-100/adapter_model.safetensors", "lora/checkpoint-100/adapter_config.json",
        "lora/checkpoint-100/trainer_state.json"]
    assert adapter_files(LISTING, "kohya") == ["kohya/my_style-000004.safetensors", "kohya/my_style.safetensors"]
    assert adapter_files(LISTING, "") == ["qwen-7b-F16-LoRA.gguf"]  # the quantised base model GGUF is no adapter
    assert adapter_files(LISTING, "qwen-7b-Q4_K_M.gguf") == ["qwen-7b-Q4_K_M.gguf"]  # named in full: taken
    assert adapter_files(LISTING, "lora/checkpoint-100/adapter_model.safetensors") == [
        "lora/checkpoint-100/adapter_model.safetensors", "lora/checkpoint-100/adapter_config.json",
        "lora/checkpoint-100/trainer_state.json"]
    assert adapter_files(LISTING, "mlx") == ["mlx/adapters.safetensors", "mlx/0000100_adapters.safetensors",
                                             "mlx/adapter_config.json"]
    assert adapter_files(LISTING, "unet") == [] and adapter_files(LISTING, "onnx") == []
    assert adapter_files(LISTING, "nowhere") == []


def test_model_files_are_one_format_at_one_level():
    assert model_files(LISTING, "") == [
        "README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    bin_only = ["config.json", "pytorch_model.bin", "tokenizer.json", "flax_model.msgpack", "tf_model.h5"]
    assert model_files(bin_only) == ["config.json", "pytorch_model.bin", "tokenizer.json"]


@pytest.mark.parametrize("spec, revision, expected", [
    ("owner/name", None, HubSpec("owner/name", None, "")),
    ("owner/name@v1.0", None, HubSpec("owner/name", "v1.0", "")),
    ("owner/name", "refs/pr/3", HubSpec("owner/name", "refs/pr/3", "")),
    ("Qwen/Qwen2.5-0.5B/sub/dir/", None, HubSpec("Qwen/Qwen2.5-0.5B", None, "sub/dir")),
    ("owner/name@abc/sub", "abc", HubSpec("owner/name", "abc", "sub")),
    ("/abs/path", None, None), ("./rel/path", None, None), ("~/x/y", None, None), ("name", None, None),
    ("owner/name/../x", None, None), ("owner--x/name", None, None), ("own er/name", None, None),
])
def test_parse_spec(spec, revision, expected):
    assert parse_spec(spec, revision) == expected
    if expected is not None and "/" not in (expected.revision or ""):
        assert parse_spec(str(expected), None) == expected  # its own spelling reads back the same


def test_two_revisions_that_differ_are_refused():
    with pytest.raises(RankscopeError, match="names revision 'v1' and --revision is 'v2'"):
        parse_spec("owner/name@v1", "v2")
