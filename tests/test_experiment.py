"""`python -m mmlite train`: the job's configuration checks, a whole tiny run folder, an exact resume, training on
CSV pairs from disk, and two CPU processes under torchrun (chapter 5)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmlite.experiment.run as run_module
from mmlite import cli
from mmlite.data.disk import export_split
from mmlite.experiment import TrainJob, flat_config, override, preset, resolve, train_job, world_for
from mmlite.train import CheckpointError, load_checkpoint, read_jsonl

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# a job small enough to train, evaluate and report in seconds on two cores
SMALL = ["data.n_train=96", "data.n_val=32", "data.n_test=32", "data.n_comp=32", "fit.steps=3", "fit.warmup=1",
         "job.batch_size=16", "job.eval_splits=val,test,comp", "job.n_bootstrap=20", "job.k_rerank=4", "model.d_model=32", "model.d_embed=32",
         "model.cnn_width=8", "model.text_depth=1", "model.fusion_depth=1", "model.decoder_depth=1",
         "model.n_heads=2"]
RESUMABLE = SMALL + ["fit.steps=4", "job.checkpoint_every=2"]  # checkpoints after steps 2 and 4
RUN_FILES = ("config.json", "checkpoint.pt", "log.jsonl", "metrics.json", "curves.png", "report.md")
SHAPES_KEYS = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "t2i_r1_ceiling", "itm_acc", "itm_auc", "vqa_acc", "bleu4",
               "cider", "caption_precision")
PAIRS_KEYS = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "bleu4", "cider")
SCENE_ONLY_KEYS = ("vqa_acc", "itm_acc", "itm_auc", "t2i_r1_ceiling", "caption_precision")


def _quiet(_: str) -> None:
    pass


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One world cache for the module, so each small world is generated once and never in the repository."""
    return tmp_path_factory.mktemp("mmlite-data")


@pytest.fixture(autouse=True)
def _world_cache(data_root, monkeypatch):
    monkeypatch.setenv("MMLITE_DATA", str(data_root))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run_a(data_root, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints after steps 2 and 4), evaluated on val, test and comp."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMLITE_DATA", str(data_root))
        job = resolve("tiny", RESUMABLE)
        out = tmp_path_factory.mktemp("run-a") / "run"
        metrics = train_job(job, out, device=CPU, progress=False, log=_quiet)
    return job, out, metrics


def _assert_interval(split: str, key: str, m: object) -> None:
    assert isinstance(m, dict) and set(m) >= {"value", "low", "high"}, f"{split}.{key}: {m!r}"
    value, low, high = m["value"], m["low"], m["high"]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in (value, low, high)), f"{split}.{key}: {m}"
    assert low <= value <= high, f"{split}.{key}: {m}"


# --------------------------------------------------------------------------- configuration checks
BAD_ARGS = [
    (["--preset", "huge"], "huge"),
    (["--set", "optim.lr=0.1"], "optim"),
    (["--set", "fit.learning_rate=0.1"], "fit.learning_rate"),
    (["--set", "fit.lr=-1"], "fit.lr"),
    (["--set", "job.batch_size=0"], "job.batch_size"),
    (["--set", "fit.steps=2.5"], "fit.steps"),
    (["--set", "fit.grad_clip=0"], "fit.grad_clip"),
    (["--set", "fit.weight_decay=-0.01"], "fit.weight_decay"),
    (["--set", "fit.lr=nan"], "fit.lr"),  # not JSON: stays the string 'nan', which is no number
    (["--set", "fit.lr=NaN"], "fit.lr"),  # JSON's NaN: a float nan
    (["--set", "fit.lr=inf"], "fit.lr"),
    (["--set", "fit.lr=Infinity"], "fit.lr"),  # JSON's Infinity: a float inf
    (["--set", "fit.lr=true"], "fit.lr"),  # a bool is no learning rate
    (["--set", "job.eval_splits=val,train"], "job.eval_splits"),
    (["--set", "model.image_encoder=vit", "--set", "model.patch_size=5"], "patch_size"),
    (["--set", "fit"], "fit"),  # no '='
    (["--device", "tpu"], "--device"),
]


@pytest.mark.parametrize("extra, named", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_are_refused_before_any_work(extra, named, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--out", str(out), "--no-progress", "--device", "cpu", *_sets(SMALL), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m mmlite train: error:") and named in err, err
    assert not out.exists(), "a refused job must not create its run folder"


def test_json_parsing_of_non_finite_values():
    """What --set hands over for the spellings of infinity and nan, and that each is refused for fit.lr."""
    assert json.loads("NaN") != json.loads("NaN") and json.loads("Infinity") == math.inf
    for text in ("nan", "NaN", "inf", "-inf", "Infinity", "-Infinity"):
        with pytest.raises(ValueError, match="fit.lr"):
            resolve("tiny", [f"fit.lr={text}"])


def test_an_out_below_an_existing_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    rc = cli.main(["train", "--out", str(blocker / "run"), "--no-progress", "--device", "cpu", *_sets(SMALL)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--out" in err, err
    assert blocker.is_file() and blocker.read_text() == "a file, not a folder\n"
    rc = cli.main(["train", "--out", str(blocker), "--no-progress", "--device", "cpu", *_sets(SMALL)])
    assert rc == 2 and "--out" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--out", str(out), "--resume", "--no-progress", "--device", "cpu", *_sets(SMALL)])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "checkpoint.pt" in err
    assert not out.exists()


def test_an_unknown_cnn_norm_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--out", str(out), "--no-progress", "--device", "cpu",
                   *_sets(SMALL + ["model.cnn_norm=layer"])])
    assert rc == 2 and "cnn_norm" in capsys.readouterr().err
    assert not out.exists()


def test_fp16_on_the_cpu_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--out", str(out), "--no-progress", "--device", "cpu",
                   *_sets(SMALL + ["fit.precision=fp16"])])
    assert rc == 2 and "fp16" in capsys.readouterr().err
    assert not out.exists()


def test_fewer_training_images_than_a_batch_are_refused():
    with pytest.raises(ValueError, match="n_train|batch_size"):
        resolve("tiny", SMALL + ["data.n_train=10"])  # a batch is 16


def test_override_coerces_values_to_the_field_types():
    job = preset("tiny")
    lr = override(job, "fit.lr", 1)
    assert lr.fit.lr == 1.0 and type(lr.fit.lr) is float and job.fit.lr == 2e-3, "a copy; the original is kept"
    assert override(job, "fit.steps", 12.0).fit.steps == 12 and type(override(job, "fit.steps", 12.0).fit.steps) is int
    assert override(job, "fit.compile", "true").fit.compile is True
    assert override(job, "fit.compile", "False").fit.compile is False
    assert override(job, "fit.compile", True).fit.compile is True
    assert override(job, "job.eval_splits", "test,comp").job.eval_splits == ("test", "comp")
    assert override(job, "job.eval_splits", ["comp"]).job.eval_splits == ("comp",)
    assert override(job, "fit.grad_clip", None).fit.grad_clip is None
    assert override(job, "model.image_encoder", "vit").model.image_encoder == "vit"
    for key, value in [("fit.compile", "yes"), ("fit.compile", 1), ("fit.steps", True), ("fit.steps", "ten"),
                       ("fit.lr", "fast"), ("job.seed", -1), ("objectives.itc", -0.5), ("fitlr", 1.0),
                       ("fit.lr.peak", 1.0), ("fit._private", 1)]:
        with pytest.raises(ValueError):
            override(job, key, value)


def test_resolve_parses_every_set_and_runs_the_cross_section_checks():
    job = resolve("small", ["fit.lr=1e-3", "job.eval_splits=test,comp", "fit.grad_clip=null", "fit.compile=false",
                            "model.dropout=0", "job.eval_splits=val"])
    assert job.fit.lr == 1e-3 and job.fit.grad_clip is None and job.fit.compile is False
    assert job.job.eval_splits == ("val",), "a later --set of the same key wins"
    assert job.model.dropout == 0.0 and type(job.model.dropout) is float
    assert job.model.d_model == 96, "the preset's own values are kept"
    assert resolve("tiny", ["model.image_encoder=vit", "model.patch_size=4"]).model.patch_size == 4
    with pytest.raises(ValueError, match="max_len"):
        resolve("tiny", ["model.max_len=3"])
    with pytest.raises(ValueError, match="preset"):
        resolve("medium")
    assert resolve("tiny") == preset("tiny") and resolve("tiny") is not resolve("tiny")


def test_every_preset_round_trips_through_its_dict():
    for name in ("tiny", "small", "base"):
        job = preset(name)
        again = TrainJob.from_dict(json.loads(json.dumps(job.to_dict())))
        assert again == job, name
    with pytest.raises(ValueError, match="sections"):
        TrainJob.from_dict({**preset("tiny").to_dict(), "optim": {}})


# --------------------------------------------------------------------------- a whole run
def test_a_tiny_job_writes_the_whole_run_folder(run_a):
    job, out, metrics = run_a
    for name in RUN_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics)), "metrics.json is what train_job returned"
    assert on_disk["steps"] == 4 and math.isfinite(on_disk["final_loss"]) and on_disk["parameters"] > 0
    assert set(on_disk["splits"]) == set(job.job.eval_splits) == {"val", "test", "comp"}
    for split, figures in on_disk["splits"].items():
        for key in SHAPES_KEYS:
            assert key in figures, f"{split} lacks {key}"
            _assert_interval(split, key, figures[key])
    report = (out / "report.md").read_text()
    assert "i2t_r1" in report and "curves.png" in report


def test_the_log_has_one_line_per_step(run_a):
    job, out, metrics = run_a
    steps = [r for r in read_jsonl(out / "log.jsonl") if "split" not in r]
    assert [r["step"] for r in steps] == list(range(1, job.fit.steps + 1))
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in steps)
    assert steps[-1]["loss"] == pytest.approx(metrics["final_loss"])


def test_config_json_round_trips_to_the_same_job(run_a):
    job, out, _ = run_a
    stored = json.loads((out / "config.json").read_text())
    assert TrainJob.from_dict(stored) == job
    state = load_checkpoint(out / "checkpoint.pt", config=flat_config(job))
    assert state["step"] == job.fit.steps


# --------------------------------------------------------------------------- resume
def _interrupting_cycle(after: int):
    """mmlite.train.cycle that hands out `after` batches and then raises as a Ctrl-C would."""
    real = run_module.cycle

    def cycle(loader):
        for k, batch in enumerate(real(loader)):
            if k == after:
                raise KeyboardInterrupt
            yield batch
    return cycle


def test_an_interrupted_and_resumed_job_ends_with_the_uninterrupted_weights(run_a, tmp_path, monkeypatch):
    job, out_a, _ = run_a
    out_b = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(run_module, "cycle", _interrupting_cycle(after=3))  # stopped while drawing step 4's batch
        with pytest.raises(KeyboardInterrupt):
            train_job(job, out_b, device=CPU, progress=False, log=_quiet)
    assert not (out_b / "metrics.json").exists()
    assert [r["step"] for r in read_jsonl(out_b / "log.jsonl")] == [1, 2, 3]
    assert load_checkpoint(out_b / "checkpoint.pt")["step"] == 2, "step 3 is lost: the last checkpoint is step 2's"
    train_job(resolve("tiny", RESUMABLE), out_b, device=CPU, resume=True, progress=False, log=_quiet)
    a = load_checkpoint(out_a / "checkpoint.pt")
    b = load_checkpoint(out_b / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"weights differ after the resume: {differ[:5]}"
    log_a = [r for r in read_jsonl(out_a / "log.jsonl") if "split" not in r]
    log_b = [r for r in read_jsonl(out_b / "log.jsonl") if "split" not in r]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4], "the log is cut at the checkpoint's step, then continued"
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]


def test_resuming_with_another_config_names_the_key(run_a, tmp_path):
    job, out_a, _ = run_a
    out = tmp_path / "run"
    shutil.copytree(out_a, out)
    changed = override(job, "fit.lr", job.fit.lr / 2)
    with pytest.raises(CheckpointError, match=r"fit\.lr"):
        train_job(changed, out, device=CPU, resume=True, progress=False, log=_quiet)


def test_a_refused_resume_keeps_the_run_folders_config(run_a, tmp_path):
    job, out_a, _ = run_a
    out = tmp_path / "run"
    shutil.copytree(out_a, out)
    with pytest.raises(CheckpointError):
        train_job(override(job, "fit.lr", job.fit.lr / 2), out, device=CPU, resume=True, progress=False,
                  log=_quiet)
    assert TrainJob.from_dict(json.loads((out / "config.json").read_text())) == job


def test_a_truncated_checkpoint_is_an_error_naming_the_file(run_a, tmp_path, capsys):
    job, out_a, _ = run_a
    out = tmp_path / "run"
    shutil.copytree(out_a, out)
    checkpoint = out / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint))):
        train_job(job, out, device=CPU, resume=True, progress=False, log=_quiet)
    rc = cli.main(["train", "--out", str(out), "--resume", "--no-progress", "--device", "cpu", *_sets(RESUMABLE)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(checkpoint) in err, err


# --------------------------------------------------------------------------- image-caption CSVs from disk
def test_training_on_csv_pairs_scores_retrieval_and_captions(tmp_path, capsys):
    job = resolve("tiny", SMALL)
    world = world_for(job.data, job.job.data_seed)
    train_csv = export_split(world["train"], tmp_path / "pairs", "train")
    val_csv = export_split(world["val"], tmp_path / "pairs", "val")
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(train_csv), "--val-data", str(val_csv), "--out", str(out),
                   "--no-progress", "--device", "cpu", *_sets(SMALL)])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val"}
    val = metrics["splits"]["val"]
    for key in PAIRS_KEYS:
        assert key in val, f"val lacks {key}"
        _assert_interval("val", key, val[key])
    assert not set(SCENE_ONLY_KEYS) & set(val), "pairs from disk have no scenes and no questions"
    stored = TrainJob.from_dict(json.loads((out / "config.json").read_text()))
    assert stored.job.eval_splits == ("val",)
    for name in RUN_FILES:
        assert (out / name).is_file(), name


def test_csv_data_needs_both_files(tmp_path, capsys):
    job = resolve("tiny", SMALL)
    world = world_for(job.data, job.job.data_seed)
    csv = export_split(world["val"], tmp_path / "pairs", "val")
    base = ["train", "--no-progress", "--device", "cpu", *_sets(SMALL)]
    for extra, named in ((["--data", str(csv)], "--val-data"), (["--val-data", str(csv)], "--data")):
        out = tmp_path / "run"
        rc = cli.main([*base, "--out", str(out), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and named in err, err
        assert not out.exists()
    missing = tmp_path / "nowhere.csv"
    rc = cli.main([*base, "--out", str(tmp_path / "run"), "--data", str(missing), "--val-data", str(csv)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and str(missing) in err, err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_two_cpu_processes_under_torchrun(data_root, tmp_path):
    sets = SMALL + ["model.cnn_norm=group", "job.eval_splits=val"]
    world_for(resolve("tiny", sets).data, 0)  # made once here, not by both ranks at the same moment
    out = tmp_path / "run"
    env = {**os.environ, "MMLITE_DATA": str(data_root), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmlite",
           "train", "--device", "cpu", "--out", str(out), "--no-progress", *_sets(sets)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {err.timeout} s:\n{err.stdout}\n{err.stderr}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val"} and metrics["steps"] == 3
    for key in SHAPES_KEYS:
        _assert_interval("val", key, metrics["splits"]["val"][key])
    assert output.count("evaluated val") == 1, "only rank 0 evaluates and writes the folder"
    assert "2 processes" in output
    steps = [r for r in read_jsonl(out / "log.jsonl") if "split" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3], "one writer: a line per step, not one per rank"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
