"""`verl-tor` command line: hydra's override grammar, flags checked at the parser (naming the flag), and
`verl-tor docs --write` never losing the file it writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from verl_tor.config import ToRConfig, ToRConfigError
from verl_tor.tools.cli import main, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- overrides: hydra's grammar
def test_overrides_mean_what_they_mean_to_hydra():
    got = parse_overrides(["tor.reasoning_ratio=1e-1", "+tor.scope=group", "++tor.seed=3", "tor.enable=false"])
    assert got == {"reasoning_ratio": 0.1, "scope": "group", "seed": 3, "enable": False}
    assert parse_overrides(["tor.perception_weight=.5", "tor.noise_std=1_000"]) == {
        "perception_weight": 0.5,
        "noise_std": 1000,
    }
    # what hydra reads as a string stays a string, and ToRConfig refuses it (no silent 1.0, no yes -> true)
    assert parse_overrides(["tor.reasoning_ratio=0x1", "tor.enable=yes"]) == {"reasoning_ratio": "0x1", "enable": "yes"}
    with pytest.raises(ToRConfigError, match="tor.reasoning_ratio='0x1' is invalid"):
        ToRConfig.from_mapping(parse_overrides(["tor.reasoning_ratio=0x1"]))
    with pytest.raises(ToRConfigError, match="tor.enable='yes' is invalid. Fix: give true or false"):
        ToRConfig.from_mapping(parse_overrides(["tor.enable=yes"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tor.scope", "is not a hydra override"),
        ("reasoning_ratio=0.2", "only tor.<field> overrides apply here"),
        ("trainer.total_epochs=1", "only tor.<field> overrides apply here"),
        ("tor.scope=batch,group", "sweeps have no meaning"),
        ("~tor.scope", "deletions and sweeps"),
    ],
)
def test_overrides_hydra_would_not_take_for_one_tor_field_are_refused(override, message):
    with pytest.raises(ToRConfigError, match=message) as err:
        parse_overrides([override])
    assert "Fix:" in str(err.value) and override in str(err.value)


def test_cli_refuses_bad_values_before_any_work(tmp_path, capsys):
    assert main(["demo", "--synthetic", "--out-dir", str(tmp_path), "tor.enable=yes"]) == 2
    assert "tor.enable='yes'" in capsys.readouterr().err
    assert main(["demo", "--synthetic", "tor.reasoning_ratio=0x1"]) == 2
    assert "tor.reasoning_ratio='0x1'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_tor_enable_false_reaches_the_demo(monkeypatch):
    """`verl-tor demo tor.enable=false` runs stock GRPO: verl's trainer with `recipes/cpu_tiny/grpo.sh` (sync, no
    ToR stage), or with --one-step the walk-through with ToR off (tests/test_demo_on_cpu.py)."""
    import verl_tor.tools.demo
    import verl_tor.tools.loop_demo

    seen, loops = [], []
    monkeypatch.setattr(verl_tor.tools.demo, "main", lambda args, cfg: seen.append(cfg) or 0)
    monkeypatch.setattr(verl_tor.tools.loop_demo, "main", lambda **kw: loops.append(kw) or 0)
    assert (
        main(["demo", "--one-step", "tor.enable=false"]) == 0 and main(["demo", "--one-step", "tor.scope=group"]) == 0
    )
    assert [cfg.enable for cfg in seen] == [False, True]
    assert main(["demo", "tor.enable=false"]) == 0 and main(["demo", "--algorithm", "dapo", "tor.scope=group"]) == 0
    assert [(kw["recipe"], kw["overrides"]) for kw in loops] == [("grpo", []), ("dapo_tor", ["tor.scope=group"])]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--synthetic", "tor.enable=false"], "tor.enable=false: `verl-tor demo --synthetic`"),
        (["inspect", "--model", "m", "--data", "d", "tor.enable=false"], "tor.enable=false: `verl-tor inspect`"),
        (["demo", "--synthetic", "tor.rank_tokens=informative"], "has no rewards"),
        (["inspect", "--model", "m", "--data", "d", "tor.rank_tokens=informative"], "has no rewards"),
    ],
)
def test_settings_a_command_cannot_honour_are_refused(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix:" in err


# ---------------------------------------------------------------------- flags, checked by the parser
@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["demo", "--n", "0"], "--n", "expected an integer >= 1, got 0"),
        (["demo", "--n", "-1"], "--n", "expected an integer >= 1, got -1"),
        (["demo", "--prompts", "0"], "--prompts", "expected an integer >= 1, got 0"),
        (["demo", "--response-length", "0"], "--response-length", "expected an integer >= 1, got 0"),
        (["demo", "--n", "2.5"], "--n", "expected an integer >= 1, got '2.5'"),
        (["demo", "--seed", "-3"], "--seed", "expected an integer >= 0"),
        (["demo", "--seed", str(2**64)], "--seed", "< 9223372036854775808"),
        (["inspect", "--model", "m", "--data", "d", "--limit", "0"], "--limit", "expected an integer >= 1, got 0"),
        (["inspect", "--model", "m", "--data", "d", "--limit", "-1"], "--limit", "got -1"),
        (["inspect", "--model", "m", "--data", "d", "--n", "0"], "--n", "got 0"),
        (["inspect", "--model", "m", "--data", "d", "--max-new-tokens", "0"], "--max-new-tokens", "got 0"),
        (["inspect", "--model", "m", "--data", "d", "--responses", "/no/such.jsonl"], "--responses", "not a file"),
    ],
)
def test_flags_are_checked_at_the_parser_naming_the_flag(argv, flag, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err, err


def test_out_dir_must_be_a_folder(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    for out_dir, message in ((a_file, "is a file, not a folder"), (a_file / "sub", "is a file")):
        with pytest.raises(SystemExit):
            main(["demo", "--out-dir", str(out_dir)])
        err = capsys.readouterr().err
        assert "argument --out-dir" in err and message in err
    assert a_file.read_text() == "keep me"


# ---------------------------------------------------------------------- docs --write
def test_docs_write_without_markers_leaves_the_file_as_it_was(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# my project\n\nno marker blocks here\n", encoding="utf-8")
    assert main(["docs", "--write", str(readme)]) == 2
    err = capsys.readouterr().err
    assert "BEGIN CONFIG TABLE" in err and "left unchanged" in err and "Fix:" in err
    assert readme.read_text(encoding="utf-8") == "# my project\n\nno marker blocks here\n"
    assert main(["docs", "--write", str(tmp_path / "missing.md")]) == 2
    assert "missing.md" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temp file left behind


def test_docs_write_regenerates_the_tables_atomically(tmp_path):
    from verl_tor.tools.cli import render_readme

    readme = tmp_path / "README.md"
    stale = (
        "intro\n<!-- BEGIN CONFIG TABLE -->\nold\n<!-- END CONFIG TABLE -->\nmiddle\n"
        "<!-- BEGIN METRICS TABLE -->\nold\n<!-- END METRICS TABLE -->\nend\n"
    )
    readme.write_text(stale, encoding="utf-8")
    os.chmod(readme, 0o640)
    assert main(["docs", "--write", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text == render_readme(stale) and "`tor.rank_tokens`" in text and "`tor/view_fallback_frac`" in text
    assert stat.S_IMODE(os.stat(readme).st_mode) == 0o640  # the file's permissions are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


# ---------------------------------------------------------------------- check-config (VERL_TOR_DRY_RUN=1)
def test_check_config_composes_and_validates_a_main_ppo_command_line(capsys):
    import subprocess

    script = ROOT / "recipes" / "qwen2_5_vl_7b_geo3k" / "dapo_tor.sh"
    env = {**os.environ, "VERL_TOR_DRY_RUN": "print", "DATA_DIR": "/data/geo3k"}
    argv = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert argv[:3] == ["python3", "-m", "verl.trainer.main_ppo"]
    assert main(["check-config", "--", *argv[3:]]) == 0
    assert "config OK: tor_trainer" in capsys.readouterr().err
    for extra, message in (
        ("tor.perception_weight=-1", "tor.perception_weight=-1.0 is invalid. Fix: give a weight >= 0"),
        ("+tor.reasonig_ratio=0.2", "did you mean tor.reasoning_ratio?"),
        ("actor_rollout_ref.actor.kl_los_coef=0.1", "ConfigCompositionException"),
        ("trainer.v1.trainer_mode=sync", "Fix: set trainer.v1.trainer_mode=tor_sync"),
    ):
        assert main(["check-config", "--", *argv[3:], extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_check_config_reads_the_packaged_config_by_package_name(capsys):
    """`--config-path=pkg://verl_tor.recipes.config`, as main_ppo takes it from an installed package (no $PWD)."""
    base = [
        "--config-path=pkg://verl_tor.recipes.config",
        "--config-name=tor_trainer",
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.n=4",
        "data.train_batch_size=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
        "trainer.n_gpus_per_node=1",
        "tor.enable=true",
    ]
    assert main(["check-config", "--", *base]) == 0
    assert "config OK: tor_trainer" in capsys.readouterr().err
    assert main(["check-config", "--", *base, "tor.reasoning_ratio=2"]) == 2
    assert "tor.reasoning_ratio" in capsys.readouterr().err


# ---------------------------------------------------------------------- --version, config-path (the installed package)
def test_version_and_config_path(capsys):
    import verl_tor
    from verl_tor.recipes import CONFIG_NAME

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"verl-tor {verl_tor.__version__}"
    assert main(["config-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / f"{CONFIG_NAME}.yaml").is_file()
    assert folder.is_relative_to(Path(verl_tor.__file__).parent)  # inside the package: it ships in the wheel
