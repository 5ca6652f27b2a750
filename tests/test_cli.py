"""The real CLI on the tiny test config: fit, the run directory, the HF export, validate,
print_config, resume."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi_pl.cli import main
from cropi_pl.grpo.module import GRPOModule
from cropi_pl.policy.build import resolve_model_path
from cropi_pl.policy.export import HFExport, module_from_checkpoint
from tests.cli_utils import ROOT, TINY, completions_table, event_tags, policy_state, run_cli

sys.path.insert(0, str(ROOT / "tools"))
import export_hf  # noqa: E402

# Metric names shared with TRL's GRPOTrainer (kl needs a reference model: kl_coef > 0).
TRL_NAMES = (
    "reward",
    "reward_std",
    "rewards/exact_number/mean",
    "rewards/exact_number/std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "entropy",
    "loss",
    "grad_norm",
)


@pytest.fixture
def fitted(tiny_fit):
    """The session's tiny fit from an empty working directory: (run dir, cwd, changed files)."""
    return tiny_fit


def test_fit_writes_tensorboard_reward_and_validation(fitted):
    run_dir = fitted[0]
    tags = event_tags(run_dir)
    assert "reward" in tags and len(tags["reward"]) == 4
    assert all(0.0 <= r <= 1.0 for r in tags["reward"])
    assert tags["rewards/exact_number/mean"] == tags["reward"]  # one reward of weight 1
    for tag in TRL_NAMES + ("val/targeted/accuracy", "accuracy", "lr-AdamW"):
        assert tag in tags, f"missing {tag}; have {sorted(tags)}"
    assert "hp_metric" not in tags
    assert all(
        0.0 <= v < 0.5 for v in tags["val/targeted/accuracy_ci95"]
    )  # formula: test_validation_interval
    assert tags["lr-AdamW"] == pytest.approx([1e-4] * 4)  # LearningRateMonitor, every step
    assert all(0.0 <= v <= 1.0 for v in tags["completions/clipped_ratio"])
    assert all(v <= 24 for v in tags["completions/max_length"])  # max_completion_length
    table = completions_table(run_dir)
    assert table[0] == ["prompt", "completion", "exact_number", "reward", "advantage"]
    assert len(table) == 2 + 4 * 4  # header, rule, 4 prompts x 4 completions
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_default_root_dir_holds_every_output(fitted):
    run_dir, cwd, changed = fitted
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "hf_model", "tensorboard"]
    assert list((run_dir / "tensorboard").glob("version_0/events.out.tfevents.*"))
    assert list(cwd.iterdir()) == [], "the run wrote into its working directory"
    assert changed == [], f"the run wrote into the checkout: {changed}"


def _reference_policy(ckpt):
    """The embedded policy with the checkpoint's weights, loaded without the export code."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny")).eval()
    state = {k.removeprefix("policy."): v for k, v in policy_state(ckpt).items()}
    model.load_state_dict(state)
    return model


def test_export_at_fit_end_reloads_with_the_modules_logits(fitted):
    run_dir = fitted[0]
    folder = run_dir / "hf_model"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    for name in ("generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    trained = _reference_policy(run_dir / "checkpoints" / "last.ckpt")
    initial = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:tiny")).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (
        tokenizer("Q: 12+7=?\nA: ")["input_ids"]
        == AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny"))("Q: 12+7=?\nA: ")[
            "input_ids"
        ]
    )
    ids = torch.randint(
        0, config["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        got, want, start = exported(ids).logits, trained(ids).logits, initial(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got - start).abs().max() > 1e-4, "the export holds the initial weights, not the trained"


def test_export_tool_writes_the_same_folder_and_refuses_other_files(fitted, tmp_path, capsys):
    run_dir = fitted[0]
    out = tmp_path / "exported"
    export_hf.main(["--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(out)])
    fit_end = load_file(run_dir / "hf_model" / "model.safetensors")
    tool = load_file(out / "model.safetensors")
    assert fit_end.keys() == tool.keys()
    for key in fit_end:
        assert torch.equal(fit_end[key], tool[key]), key
    with pytest.raises(SystemExit, match="export_hf: .*model.safetensors is not a Lightning"):
        export_hf.main(["--ckpt", str(out / "model.safetensors"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_export_refuses_checkpoints_of_other_modules(tmp_path):
    other = tmp_path / "other.ckpt"
    hparams = {"_class_path": "lightning.pytorch.demos.boring_classes.BoringModel", "model": "x"}
    torch.save(
        {"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": hparams}, other
    )
    with pytest.raises(ValueError, match="BoringModel, not of cropi_pl's GRPOModule"):
        module_from_checkpoint(other)
    torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(ValueError, match="hyper_parameters are missing"):
        module_from_checkpoint(other)
    with pytest.raises(ValueError, match="no meta.pt"):
        module_from_checkpoint(tmp_path)


def test_outputs_default_to_the_run_dir_and_explicit_choices_win(tmp_path):
    def trainer(*args):
        cli = main(
            ["--config", str(TINY), f"--trainer.default_root_dir={tmp_path}", *args], run=False
        )
        return cli.trainer

    t = trainer()
    assert Path(t.logger.save_dir) == tmp_path and t.logger.name == "tensorboard"
    (ckpt,) = t.checkpoint_callbacks
    assert Path(ckpt.dirpath) == tmp_path / "checkpoints" and ckpt.save_last and not ckpt.save_top_k
    (export,) = [c for c in t.callbacks if isinstance(c, HFExport)]
    assert export.path(t) == tmp_path / "hf_model"
    assert not trainer("--trainer.enable_checkpointing=false").checkpoint_callbacks
    own = trainer(
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path}/mine"
    ).checkpoint_callbacks
    assert [Path(c.dirpath) for c in own] == [tmp_path / "mine"]
    explicit = trainer(
        "--trainer.logger=TensorBoardLogger", f"--trainer.logger.save_dir={tmp_path}/tb"
    ).logger
    assert Path(explicit.save_dir) == tmp_path / "tb"
    curriculum = "--curriculum=cropi_pl.curriculum.callback.CurriculumCallback"
    with pytest.raises(ValueError, match="two curricula"):
        trainer(curriculum, "--trainer.callbacks+=cropi_pl.curriculum.callback.CurriculumCallback")


def test_print_config_and_validate(tmp_path):
    out = run_cli("fit", "--print_config", run_dir=tmp_path).stdout
    assert "class_path: cropi_pl.grpo.module.GRPOModule" in out
    assert "num_generations: 4" in out
    proc = run_cli("validate", run_dir=tmp_path)
    assert "val/targeted/accuracy" in proc.stdout


def test_resume_continues_same_step_and_data(tiny_fit, tmp_path):
    straight, split = tiny_fit[0], tmp_path / "split"  # the session's fit is the straight run
    run_cli("fit", "--trainer.max_steps=2", run_dir=split)
    first = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    run_cli("fit", "--ckpt_path=last", run_dir=split)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    dm_key = next(k for k in a if k.endswith("CurriculumDataModule"))
    assert a[dm_key] == b[dm_key]
    wa = policy_state(straight / "checkpoints" / "last.ckpt")
    wb = policy_state(split / "checkpoints" / "last.ckpt")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_from_last_without_a_checkpoint_is_an_error_unless_opted_in(tmp_path):
    proc = run_cli("fit", "--ckpt_path=last", run_dir=tmp_path / "a", check=False)
    assert proc.returncode != 0
    assert "--ckpt_path last: no last checkpoint in" in proc.stderr
    assert "--resume_if_missing true" in proc.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()  # stopped before training
    run_dir = tmp_path / "b"
    run_cli(
        "fit",
        "--ckpt_path=last",
        "--resume_if_missing=true",
        "--trainer.max_steps=1",
        run_dir=run_dir,
    )
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_fp16_mixed_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="precision '16-mixed' needs a GPU"):
        main(
            [
                "--config",
                str(TINY),
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.precision=16-mixed",
            ],
            run=False,
        )


@pytest.mark.parametrize("name", ["runs/x/hf_model", "./no_model", "/no/such/model"])
def test_missing_local_model_path_says_so_before_any_hub_lookup(name):
    with pytest.raises(FileNotFoundError, match=r"local path .* does not exist"):
        GRPOModule(model=name)
    with pytest.raises(FileNotFoundError, match=r"local path .* does not exist"):
        resolve_model_path(name)
    assert resolve_model_path("org/name") == "org/name"  # hub names still pass through
