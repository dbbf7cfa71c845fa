"""Every command shown in README.md, docs/*.md and the `--help` examples runs, on tiny stand-ins of the same formats.

`doc_commands()` reads each fenced shell block (continuation lines joined, `$ ` prompts and `# comments` dropped)
and keeps the lines that call `mimlab` (directly, under torchrun, srun or `python -m`) or `make`. Every such line
must match exactly one row of `TABLE`: `Run()` runs it here, scaled down by `tiny()` (the rules are listed there),
`Skip(why)` says why it cannot run here. A command added to the docs without a row fails
`test_every_documented_command_has_a_row`, a row whose command left the docs fails it too.

Stand-ins: each checkpoint a command names is written before the run at the same path, in the family's own
layout (official SimMIM, DeiT, MAE, MoCo v3, SimMIM SwinV2 files; Hugging Face save_pretrained directories); each
dataset directory (`DIR`, `/data/imagenet/...`) is a small generated image folder. Every command runs in one shared
working directory, in the docs' order, so that a command that reads a run's output (`runs/simmim/model.safetensors`)
reads what the documented command before it wrote.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch

from mimlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HELP_VERBS = ("probe", "pretrain", "transfer", "reproduce", "data")      # their --help examples too
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


# ------------------------------------------------------------------------------------------------ the docs' commands
@dataclass(frozen=True)
class DocCommand:
    file: str          # relative to the repository root
    line: int
    text: str          # one command, continuation lines joined, no prompt, no trailing comment
    vars: tuple        # (NAME, value) shell assignments made earlier in the same file


def _strip_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (after a space, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def _block_commands(lines: list[str], file: str, start: int, assigned: list) -> list[DocCommand]:
    """The commands of one shell block (`assigned` collects its NAME=value lines for the commands after them)."""
    found, i = [], 0
    while i < len(lines):
        first, cmd = i, lines[i].rstrip()
        while cmd.endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        cmd = _strip_comment(cmd.strip().removeprefix("$ ").strip())
        if re.fullmatch(r"[A-Z_]+=\S+", cmd):
            assigned.append(tuple(cmd.split("=", 1)))
        elif re.search(r"(^|\s|-m )mimlab\s", cmd + " ") or cmd.startswith("make "):
            found.append(DocCommand(file, start + first, " ".join(cmd.split()), tuple(assigned)))
    return found


def help_epilog(verb: str) -> str:
    """What `mimlab VERB --help` prints after its options (the examples)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main([verb, "--help"])
    text = buf.getvalue()
    return text[text.find("\nexamples:"):] if "\nexamples:" in text else ""


def doc_commands() -> list[DocCommand]:
    found = []
    for path in DOCS:
        text = path.read_text()
        assigned: list[tuple[str, str]] = []
        for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            if block.group(1) in ("python", "yaml", "json", "text"):
                continue
            start = text[:block.start()].count("\n") + 2
            found += _block_commands(block.group(2).split("\n"), str(path.relative_to(ROOT)), start, assigned)
    for verb in HELP_VERBS:
        found += _block_commands(help_epilog(verb).split("\n"), f"mimlab {verb} --help", 0, [])
    return found


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Run:
    """Run it here, scaled by `tiny()`."""


@dataclass(frozen=True)
class Skip:
    why: str


NEEDS_GPU_CLUSTER = "a synopsis, not a command"
TABLE: list[tuple[str, str, Run | Skip]] = [
    # (file, the command's start, what this test does)
    ("README.md", "make demo", Skip("the whole quick study: `reproduce --preset quick` below runs its plan here; "
                                    "its wall time is measured in benchmarks/RESULTS.md")),
    ("README.md", "make test", Skip("this test suite itself")),
    ("README.md", "mimlab probe vit_small_patch16_224 --data builtin", Run()),
    ("README.md", "mimlab probe simmim=beit_base_patch16_224@simmim_pretrain__vit_base", Run()),
    ("README.md", "mimlab pretrain --method simmim --model vit_tiny_patch16_224", Run()),
    ("README.md", "torchrun --nproc_per_node 8 -m mimlab pretrain --method simmim --model beit_base", Run()),
    ("README.md", "mimlab data keypoints --out data/kp", Run()),
    ("README.md", "mimlab transfer --task keypoints --backbone simmim=vit_tiny_patch16_224@runs/simmim", Run()),
    ("README.md", "mimlab reproduce --preset quick", Run()),
    ("README.md", "mimlab reproduce --preset cpu", Run()),
    ("README.md", "mimlab reproduce --preset gpu", Run()),
    ("README.md", "mimlab reproduce --config study.yaml", Run()),
    ("docs/checkpoints.md", "mimlab probe simmim=beit_base_patch16_224@ckpt/simmim_pretrain__vit_base", Run()),
    ("docs/checkpoints.md", "mimlab probe mae=vit_base_patch16_224@ckpt/mae_pretrain_vit_base.pth", Run()),
    ("docs/checkpoints.md", "mimlab probe mocov3=vit_base_patch16_224@ckpt/vit-b-300ep.pth.tar", Run()),
    ("docs/checkpoints.md", "mimlab probe deit=deit_base_patch16_224@ckpt/deit_base", Run()),
    ("docs/data.md", "mimlab data fractal-leaves --classes 100", Run()),
    ("docs/data.md", "mimlab data fractals --classes 10", Run()),
    ("docs/pretrain.md", "mimlab pretrain --method {simmim,mae,supervised} --model ARCH", Skip(NEEDS_GPU_CLUSTER)),
    ("docs/pretrain.md", 'mimlab probe "simmim=vit_tiny_patch16_224@runs/simmim/model.safetensors"', Run()),
    ("docs/pretrain.md", "mimlab pretrain --method simmim --model vit_tiny_patch16_224", Run()),
    ("docs/pretrain.md", "torchrun --standalone --nproc_per_node 2 -m mimlab pretrain", Run()),
    ("docs/pretrain.md", "torchrun --standalone --nproc_per_node 8 -m mimlab pretrain", Run()),
    ("docs/pretrain.md", "torchrun --nnodes 2", Skip("two nodes, and '... same arguments ...' stands for the line "
                                                     "above, which runs here")),
    ("docs/pretrain.md", "WANDB_MODE=offline mimlab pretrain", Run()),
    ("docs/probe.md", "mimlab probe swinv2=swinv2_base_window12_192@ckpt/simmim_pretrain__swinv2", Run()),
    ("docs/probe.md", "mimlab probe mae=hf:ckpt/vit-mae-base deit=hf:ckpt/deit-base-distilled", Run()),
    ("docs/probe.md", "mimlab probe deit=deit_small_patch16_224@deit.pth --data DIR --maps 2", Run()),
    ("docs/reproduce.md", "mimlab reproduce --preset cpu --print-config > study.yaml", Run()),
    ("docs/reproduce.md", "mimlab reproduce --config study.yaml", Run()),
    ("docs/scale.md", "torchrun --nproc_per_node 4 -m mimlab probe deit=deit_small_patch16_224@deit.pth", Run()),
    ("docs/scale.md", "srun python -m mimlab pretrain", Run()),
    ("docs/scale.md", "mimlab reproduce --preset cpu --out runs/cpu --list-stages", Run()),
    ("docs/scale.md", "mimlab reproduce --preset cpu --out runs/cpu --stage pretrain/simmim", Run()),
    ("docs/scale.md", "srun python -m mimlab reproduce --preset cpu", Run()),
    ("docs/scale.md", "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m mimlab probe", Run()),
    ("docs/transfer.md", "mimlab transfer --task {classify,keypoints,depth,track} --backbone [LABEL=]ARCH",
     Skip(NEEDS_GPU_CLUSTER)),
    ("docs/transfer.md", "mimlab data finegrained --out data/finegrained", Run()),
    ("docs/transfer.md", "mimlab data keypoints --out data/keypoints", Run()),
    ("docs/transfer.md", "mimlab data depth --out data/depth", Run()),
    ("docs/transfer.md", "mimlab data tracking --out data/tracking", Run()),
    ("docs/transfer.md", "mimlab transfer --task classify --backbone vit_tiny_patch16_224", Run()),
    ("docs/transfer.md", "mimlab transfer --task keypoints --backbone vit_tiny_patch16_224", Run()),
    ("docs/transfer.md", "mimlab transfer --task depth --backbone vit_tiny_patch16_224", Run()),
    ("docs/transfer.md", "mimlab transfer --task track --backbone vit_tiny_patch16_224", Run()),
    ("mimlab probe --help", "mimlab probe vit_small_patch16_224 --data builtin", Run()),
    ("mimlab probe --help", "mimlab probe sim=beit_base_patch16_224@simmim_pretrain.pth", Run()),
    ("mimlab pretrain --help", "mimlab pretrain --method simmim --model vit_tiny_patch16_224", Run()),
    ("mimlab pretrain --help", "torchrun --nproc_per_node 8 -m mimlab pretrain", Run()),
    ("mimlab transfer --help", "mimlab data keypoints --out data/kp", Run()),
    ("mimlab transfer --help", "mimlab transfer --task keypoints --backbone simmim=", Run()),
    ("mimlab transfer --help", "mimlab data finegrained --out data/fg", Run()),
    ("mimlab transfer --help", "mimlab transfer --task classify --backbone deit=", Run()),
    ("mimlab reproduce --help", "mimlab reproduce --preset quick --out runs/demo", Run()),
    ("mimlab reproduce --help", "mimlab reproduce --preset cpu --print-config > study.yaml", Run()),
    ("mimlab reproduce --help", "mimlab reproduce --config study.yaml --out runs/mine --list-stages", Run()),
    ("mimlab reproduce --help", "mimlab reproduce --config study.yaml --out runs/mine", Run()),
    ("mimlab data --help", "mimlab data fractal-leaves --classes 100", Run()),
    ("mimlab data --help", "mimlab data depth --out data/depth", Run()),
]


def row_of(cmd: DocCommand) -> tuple[str, str, Run | Skip]:
    """The row whose command start is the longest one this command begins with."""
    rows = sorted((r for r in TABLE if r[0] == cmd.file and cmd.text.startswith(r[1])), key=lambda r: -len(r[1]))
    assert rows, f"{cmd.file}:{cmd.line}: no row of TABLE matches: {cmd.text}"
    return rows[0]


def test_every_documented_command_has_a_row():
    cmds = doc_commands()
    unlisted = [f"{c.file}:{c.line}: {c.text}" for c in cmds
                if not any(r[0] == c.file and c.text.startswith(r[1]) for r in TABLE)]
    assert not unlisted, "documented commands with no row in TABLE (add one):\n" + "\n".join(unlisted)
    stale = [r for r in TABLE if not any(r[0] == c.file and c.text.startswith(r[1]) for c in cmds)]
    assert not stale, f"rows whose command is no longer in the docs: {stale}"
    used = [row_of(c) for c in cmds]
    shadowed = [r for r in TABLE if r not in used]
    assert not shadowed, f"rows that no command uses (a longer row takes their commands): {shadowed}"


# ------------------------------------------------------------------------------------------------ scaling down
TINY_VIT = {"depth": "2", "embed_dim": "32", "num_heads": "2"}
TINY_VIT_SIZE = {"img_size": "64", "patch_size": "4"}         # only where the command gives no size of its own
TOKENS, PATCH_PIXELS = (64 // 4) ** 2, 4 * 4 * 3               # (a 16x16 grid: --map-query 10,10 is on it)
TINY_SWIN = {"img_size": "32", "window_size": "4", "pretrained_window_sizes": "4x4", "embed_dim": "16",
             "depths": "2x2", "num_heads": "2x4"}
SMALLER = {  # option -> value, per verb: images, steps and sizes a 2-core CPU runs in seconds
    "probe": {"--images": "8", "--batch-size": "4", "--bootstrap": "20"},
    "pretrain": {"--steps": "2", "--batch-size": "8", "--save-every": "1", "--probe-every": "1",
                 "--probe-images": "8"},
    "transfer": {"--steps": "2", "--batch-size": "4"},
    "data": {"--classes": "3", "--per-class": "3", "--val-per-class": "2", "--size": "32", "--workers": "1",
             "--num-classes": "3", "--train-per-class": "4", "--train-images": "6", "--val-images": "3",
             "--train-sequences": "2", "--val-sequences": "2", "--length": "6", "--width": "32", "--height": "24"},
}
ADD = {"probe": ["--images", "8", "--batch-size", "4", "--bootstrap", "20"], "pretrain": ["--steps", "2"],
       "transfer": ["--steps", "2", "--batch-size", "4"], "data": []}
DATA_DEFAULTS = {"finegrained": ["--num-classes", "3", "--train-per-class", "4", "--val-per-class", "2"],
                 "keypoints": ["--train-images", "6", "--val-images", "3", "--size", "32"],
                 "depth": ["--train-images", "6", "--val-images", "3", "--width", "32", "--height", "24"],
                 "tracking": ["--train-sequences", "2", "--val-sequences", "2", "--length", "6", "--size", "48"]}
DROP = {"--compile"}                   # torch.compile: tens of seconds of compiling for 2 steps (tested elsewhere)
DATA_DIRS = {"DIR": "data/images", "/data/imagenet/val": "data/imagenet/val",
             "/data/imagenet/train": "data/imagenet/train"}


def _tiny_kwargs(text: str, spec: str) -> str:
    kw = dict(p.split("=", 1) for p in text.split(",") if p)
    if "swin" in spec:
        kw.update(TINY_SWIN)
    elif not spec.split("=")[-1].startswith("hf:"):
        kw.update(TINY_VIT)
        if "img_size" not in kw:
            kw.update(TINY_VIT_SIZE)
    return ",".join(f"{k}={v}" for k, v in kw.items())


def tiny(verb: str, args: list[str]) -> list[str]:
    """The documented arguments at toy scale: the same verb, models, checkpoint formats and options, with
    - every timm ViT at depth 2, width 32, 2 heads (and 64 px, patch 4 where the command gives no size), Swin(V2)
      at 32 px with 4x4 windows; Hugging Face directories as saved;
    - a few images, steps and samples (`SMALLER`); `--device cuda` -> cpu; `--compile` dropped;
    - dataset paths (`DIR`, `/data/imagenet/...`) -> small generated image folders;
    - `reproduce`: `--list-stages` added (every stage's config is built and checked, nothing runs: the stages
      themselves run at toy scale in tests/test_reproduce.py)."""
    out: list[str] = []
    models: list[str] = []
    if verb == "probe":                         # the model specs come first, before any option
        for a in args:
            if a.startswith("-"):
                break
            models.append(a)
    backbone = args[args.index("--model") + 1] if "--model" in args else (
        args[args.index("--backbone") + 1] if "--backbone" in args else "")
    kw_seen = 0
    i = 0
    while i < len(args):
        a = args[i]
        if a in DROP:
            i += 1
            continue
        if a == "--model-kwargs":
            spec = models[kw_seen] if kw_seen < len(models) else (models[-1] if models else backbone)
            out += [a, _tiny_kwargs(args[i + 1], spec)]
            kw_seen += 1
            i += 2
            continue
        if a in SMALLER.get(verb, {}) and i + 1 < len(args):
            out += [a, SMALLER[verb][a]]
            i += 2
            continue
        if a == "--device":
            out += [a, "cpu"]
            i += 2
            continue
        out.append(DATA_DIRS.get(a, a))
        i += 1
    if verb in ("probe", "pretrain", "transfer"):
        specs = models if verb == "probe" else [backbone]
        for spec in specs[kw_seen:]:           # models the command gives no kwargs: tiny ones
            if not spec.split("=")[-1].startswith("hf:"):
                out += ["--model-kwargs", _tiny_kwargs("", spec)]
        for k in range(0, len(ADD[verb]), 2):
            if ADD[verb][k] not in out:
                out += ADD[verb][k:k + 2]
        if verb != "probe" and "--no-progress" not in out:
            out.append("--no-progress")
    if verb == "data" and args and args[0] in DATA_DEFAULTS:
        for k in range(0, len(DATA_DEFAULTS[args[0]]), 2):
            if DATA_DEFAULTS[args[0]][k] not in out:
                out += DATA_DEFAULTS[args[0]][k:k + 2]
    if verb == "reproduce" and "--print-config" not in out:
        out.append("--list-stages")
    return out


# ------------------------------------------------------------------------------------------------ stand-ins
def _timm(arch: str, kwargs: str, **extra) -> torch.nn.Module:
    from mimlab.models.factory import parse_model_kwargs

    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **{**parse_model_kwargs(kwargs), **extra}).eval()


def _vit_kw(text: str = "") -> str:
    return _tiny_kwargs(text, "vit")


def write_standins(cwd: Path) -> None:
    """The checkpoints the docs name, at their paths, in their families' own layouts (tiny sizes as `tiny()`)."""
    (cwd / "ckpt").mkdir(exist_ok=True)
    # official SimMIM ViT-B: a BEiT-shaped encoder with a shared relative position bias, {'model': encoder.* ...}
    beit = _timm("beit_base_patch16_224", _vit_kw(), use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
                 init_values=0.1, use_fc_norm=False, num_classes=0)
    sd = {f"encoder.{k}": v for k, v in beit.state_dict().items() if not k.endswith("relative_position_index")}
    sd["encoder.mask_token"] = torch.zeros(1, 1, 32)
    sd["decoder.0.weight"], sd["decoder.0.bias"] = torch.randn(PATCH_PIXELS, 32, 1, 1), torch.zeros(PATCH_PIXELS)
    for where in (cwd, cwd / "ckpt"):
        torch.save({"model": sd}, where / "simmim_pretrain__vit_base__img224__800ep.pth")
    torch.save({"model": sd}, cwd / "simmim_pretrain.pth")                           # `mimlab probe --help`
    # official DeiT: {'model': state dict with its classifier}
    for arch, path in (("deit_base_patch16_224", cwd / "deit_base_patch16_224-b5f2ef4d.pth"),
                       ("deit_base_patch16_224", cwd / "ckpt/deit_base_patch16_224-b5f2ef4d.pth"),
                       ("deit_base_patch16_224", cwd / "deit_base.pth"),
                       ("deit_small_patch16_224", cwd / "deit.pth")):
        torch.save({"model": _timm(arch, _vit_kw(), num_classes=10).state_dict()}, path)
    # official MAE pretraining: encoder + decoder in {'model': ...}
    mae = dict(_timm("vit_base_patch16_224", _vit_kw(), num_classes=0).state_dict())
    mae.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, 32),
                "decoder_pos_embed": torch.zeros(1, 1 + TOKENS, 16),
                "decoder_pred.weight": torch.randn(PATCH_PIXELS, 16)})
    torch.save({"model": mae}, cwd / "ckpt/mae_pretrain_vit_base.pth")
    # MoCo v3: {'state_dict': module.base_encoder.* / module.momentum_encoder.* / module.predictor.*}
    enc = _timm("vit_base_patch16_224", _vit_kw(), num_classes=0).state_dict()
    moco = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    moco.update({f"module.momentum_encoder.{k}": torch.randn_like(v) for k, v in enc.items()})
    moco["module.predictor.0.weight"] = torch.randn(16, 16)
    torch.save({"state_dict": moco, "epoch": 300}, cwd / "ckpt/vit-b-300ep.pth.tar")
    # official SimMIM SwinV2 (encoder.*, the official end-of-stage downsample, buffers, decoder)
    from test_probe_swin import _official_layout

    swin_kw = ",".join(f"{k}={v}" for k, v in TINY_SWIN.items())
    swin = _timm("swinv2_base_window12_192", swin_kw, num_classes=0)
    torch.save(_official_layout(swin), cwd / "ckpt/simmim_pretrain__swinv2_base__img192_window12__800ep.pth")
    # Hugging Face save_pretrained directories
    transformers = pytest.importorskip("transformers")
    hf = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8, qkv_bias=True)
    torch.manual_seed(0)
    transformers.ViTMAEModel(transformers.ViTMAEConfig(**hf)).save_pretrained(cwd / "ckpt/vit-mae-base")
    transformers.DeiTModel(transformers.DeiTConfig(**hf), add_pooling_layer=False).save_pretrained(
        cwd / "ckpt/deit-base-distilled")
    for d in DATA_DIRS.values():
        assert main(["data", "fractals", "--classes", "2", "--per-class", "4", "--size", "32", "--out", str(cwd / d),
                     "--quiet"]) == 0


# ------------------------------------------------------------------------------------------------ running them
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(cmd: DocCommand) -> tuple[dict[str, str], str, list[str], str | None]:
    """-> (environment, launcher 'inproc'|'torchrun'|'srun', mimlab arguments, stdout redirection file)."""
    text = cmd.text
    for name, value in cmd.vars:
        text = text.replace(f"${name}", value)
    text = re.sub(r'"\$\(sed [^"]*\)"', "data/classify", text)   # the array job's stage: the graph's first one
    words = shlex.split(text)
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    redirect = None
    if ">" in words:
        redirect = words[words.index(">") + 1]
        words = words[:words.index(">")]
    if words[0] == "torchrun":
        return env, "torchrun", words[words.index("mimlab") + 1:], redirect
    if words[0] == "srun":
        return env, "srun", words[words.index("mimlab") + 1:], redirect
    assert words[0] == "mimlab", cmd
    return env, "inproc", words[1:], redirect


def _fresh_out(args: list[str], cwd: Path) -> list[str]:
    """A documented --out that an earlier documented command already wrote gets a new name (a second example of
    the same verb into `runs/simmim`); the commands that read it keep reading the first."""
    if "--out" in args and "--list-stages" not in args and "--resume" not in args:
        k = args.index("--out") + 1
        base, n = args[k], 2
        while (cwd / args[k]).exists():
            args[k] = f"{base}-{n}"
            n += 1
    return args


def run_command(cmd: DocCommand, cwd: Path, capsys) -> tuple[int, str]:
    env, launcher, args, redirect = _split(cmd)
    verb = args[0]
    args = _fresh_out([verb, *tiny(verb, args[1:])], cwd)
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    if launcher == "torchrun":
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "mimlab", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    if launcher == "srun":      # one task of an srun step: the SLURM variables, no torchrun's
        slurm = dict(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1",
                     SLURM_STEP_NUM_NODES="1", SLURM_JOB_ID="4242", MASTER_PORT=str(_free_port()))
        proc = subprocess.run([sys.executable, "-m", "mimlab", *args], cwd=cwd, env={**full_env, **slurm},
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    old = dict(os.environ)
    os.environ.update(env)
    try:
        capsys.readouterr()
        rc = main(args)
        got = capsys.readouterr()
    finally:
        os.environ.clear()
        os.environ.update(old)
    if redirect:
        (cwd / redirect).write_text(got.out)
    return rc, got.out + got.err


def test_every_documented_command_runs(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    write_standins(tmp_path)
    capsys.readouterr()
    assert main(["reproduce", "--preset", "quick", "--print-config"]) == 0    # README's --config study.yaml
    (tmp_path / "study.yaml").write_text(capsys.readouterr().out)
    ran, failed = 0, []
    for cmd in doc_commands():
        if isinstance(row_of(cmd)[2], Skip):
            continue
        rc, output = run_command(cmd, tmp_path, capsys)
        ran += 1
        if rc != 0:
            failed.append(f"{cmd.file}:{cmd.line}: {cmd.text}\n  exit {rc}: {output.strip()[-1500:]}")
    assert not failed, "\n\n".join(failed)
    assert ran == sum(isinstance(r[2], Run) for r in TABLE)
