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


def test_tor_enable_false_reaches_the_demo(monkeypatch, tmp_path):
    """`verl-tor demo tor.enable=false` runs stock GRPO: verl's trainer with `recipes/cpu_tiny/grpo.sh` (sync, no
    ToR stage), or with --one-step the walk-through with ToR off (tests/test_demo_on_cpu.py); with --algorithm dapo
    stock DAPO (`recipes/cpu_tiny/dapo.sh`; it used to run grpo.sh)."""
    monkeypatch.chdir(tmp_path)
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
    assert main(["demo", "tor.enable=false", "--algorithm", "dapo"]) == 0  # stock DAPO, not stock GRPO
    assert [(kw["recipe"], kw["overrides"]) for kw in loops] == [
        ("grpo", []),
        ("dapo_tor", ["tor.scope=group"]),
        ("dapo", []),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--synthetic", "tor.enable=false"], "tor.enable=false: `verl-tor demo --synthetic`"),
        (["inspect", "--model", "m", "--data", "d", "tor.enable=false"], "tor.enable=false: `verl-tor inspect`"),
        (["demo", "--synthetic", "tor.rank_tokens=informative"], "has no rewards"),
        (["inspect", "--model", "m", "--data", "d", "tor.rank_tokens=informative"], "has no rewards"),
        (["demo", "--synthetic", "tor.scorer_policy=ref"], "`verl-tor demo --synthetic` has no model"),
        (["demo", "--one-step", "tor.scorer_policy=ref"], "`verl-tor demo --one-step` has one model"),
        (["inspect", "--model", "m", "--data", "d", "tor.scorer_policy=ref"], "`verl-tor inspect` has one model"),
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
        (["demo", "--seed", "-3"], "--seed", "expected an integer from 0 to 4294967294, got -3"),
        (["demo", "--seed", str(2**64)], "--seed", "from 0 to 4294967294"),
        # verl exports the rollout seed (seed + 1) as PYTHONHASHSEED: 2^32 - 1 would kill every Ray worker
        (["demo", "--seed", str(2**32 - 1)], "--seed", "PYTHONHASHSEED"),
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


# ---------------------------------------------------------------------- verl-tor demo: checked before Ray starts
@pytest.fixture
def loop_calls(monkeypatch, tmp_path):
    """``verl-tor demo`` up to verl's trainer: ``run_cpu_recipe`` records its call instead of starting main_ppo, and
    the demo's data are not written (their row count is then the default 256)."""
    import verl_tor.local.launch as launch
    import verl_tor.local.prepare as prepare

    calls: list[dict] = []

    def fake_run(recipe, overrides, *, cpu_dir, experiment, env, on_step=None, **_):
        out = Path(cpu_dir) / "runs" / experiment
        maps = out / "tor_token_maps"
        maps.mkdir(parents=True, exist_ok=True)
        steps = int(env["TOTAL_STEPS"])
        for i in range(1, steps + 1):
            (maps / f"step_{i:06d}.html").write_text("map")
        (out / "main_ppo.log").write_text(f"run {len(calls) + 1}")
        calls.append(dict(recipe=recipe, overrides=list(overrides), cpu_dir=cpu_dir, experiment=experiment, env=env))
        metrics = [{"step": i, "actor/pg_loss": 0.1, "tor/sensitivity_threshold": 0.0013} for i in range(1, steps + 1)]
        for step in metrics:
            on_step(step)
        return launch.LoopRun(returncode=0, steps=metrics, log_path=str(out / "main_ppo.log"), out_dir=str(out))

    monkeypatch.setattr(launch, "run_cpu_recipe", fake_run)
    monkeypatch.setattr(prepare, "prepare", lambda out_dir, seed=0: {"model": "m", **prepare.data_paths(out_dir)})
    monkeypatch.chdir(tmp_path)
    return calls


def test_synthetic_demo_runs_without_a_response_length(capsys):
    """`verl-tor demo --synthetic` (in the README) used to fail with a TypeError (None // int)."""
    assert main(["demo", "--synthetic"]) == 0
    assert "x <= 48 tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # verl's dataloader drops the incomplete batch: 0 steps an epoch, ZeroDivisionError in fit
        (["--prompts", "300", "--n", "1"], "--prompts 300: the demo's data hold 256 training problems"),
        # hydra reads a comma as a sweep ("Ambiguous value") once main_ppo has started
        (["--out-dir", "{tmp}/a,b"], "--out-dir '{tmp}/a,b': verl's hydra command line cannot carry this path"),
        (["--out-dir", "{tmp}/it's"], "cannot carry this path"),
        (["--out-dir", "{tmp}/a#b"], "cannot carry this path"),
        (["--out-dir", "{tmp}/${{x}}"], "cannot carry this path"),
        # the DAPO recipe has no KL loss, hence no reference worker for the image-free pass
        (["--algorithm", "dapo", "tor.scorer_policy=ref"], "the DAPO recipe has no KL loss"),
        # every reward 0: dynamic sampling discards every group and samples forever
        (["--algorithm", "dapo", "--response-length", "8"], "keeps sampling forever"),
        # a verl setting the demo sets from a flag names the flag (it used to suggest tor.total_training_steps)
        (["trainer.total_training_steps=3"], "Fix: use --steps"),
        (["data.train_batch_size=8"], "Fix: use --prompts"),
    ],
)
def test_demo_refuses_before_any_work_what_verls_trainer_would_fail_on(argv, message, loop_calls, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["demo", "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Fix:" in err and err.count("\n") == 1, err
    assert "tor.total_training_steps" not in err
    assert loop_calls == [] and list(tmp_path.iterdir()) == []  # nothing written, main_ppo never started


def test_demo_refuses_more_prompts_than_its_data_hold(loop_calls, tmp_path, capsys):
    """The limit is the training file's own row count where the data already exist (the loop tests write 32)."""
    from verl_tor.figures import write_figure_parquet

    write_figure_parquet(str(tmp_path / "d" / "data"), n_train=8, n_val=2)
    assert main(["demo", "--out-dir", "d", "--prompts", "9"]) == 2
    assert "hold 8 training problems" in capsys.readouterr().err and loop_calls == []
    assert main(["demo", "--out-dir", "d", "--prompts", "8", "--steps", "3"]) == 0
    # one batch an epoch: verl's trainer stops after steps_per_epoch x total_epochs steps, so 3 epochs for 3 steps
    assert loop_calls[0]["env"]["TOTAL_EPOCHS"] == "3" and loop_calls[0]["env"]["TOTAL_STEPS"] == "3"


def test_hydra_safe_paths_pass():
    from verl_tor.local.launch import check_hydra_path

    for path in ("/tmp/a b/c", "/tmp/x:y@z/1.0_-", "/tmp/null", "/tmp/true"):
        check_hydra_path("--out-dir", path)


def test_every_demo_run_gets_a_fresh_run_folder(loop_calls, tmp_path, capsys):
    """A second demo into the same --out-dir used to report the first run's token maps (4 of them) and overwrite its
    main_ppo.log and metrics.jsonl. Each run now has its own folder; the data are shared."""
    assert main(["demo", "--out-dir", "d"]) == 0
    first = capsys.readouterr().out
    assert main(["demo", "--out-dir", "d", "--steps", "2"]) == 0
    second = capsys.readouterr().out
    runs = tmp_path / "d" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["grpo_tor-1", "grpo_tor-2"]
    assert [c["experiment"] for c in loop_calls] == ["grpo_tor-1", "grpo_tor-2"]
    assert f"token maps (4): {runs / 'grpo_tor-1' / 'tor_token_maps'}/" in first
    assert f"token maps (2): {runs / 'grpo_tor-2' / 'tor_token_maps'}/" in second
    assert f"open {runs / 'grpo_tor-2' / 'tor_token_maps' / 'step_000002.html'}" in second
    assert (runs / "grpo_tor-1" / "main_ppo.log").read_text() == "run 1"  # the first run's log is untouched


def test_demo_progress_and_summary_say_what_happened(loop_calls, capsys):
    """|Δlogp| cut 0.0013 used to print as 0.00; "1 steps"; "checkpoints" where the demo saves none."""
    assert main(["demo", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "|Δlogp| cut 0.0013" in out and "step 1/1" in out
    assert "recipes/cpu_tiny/grpo_tor.sh, 1 step (" in out and "[demo] 1 step of verl's real trainer (ToR-GRPO)" in out
    assert "checkpoint" not in out and "metrics.jsonl and verl's log (main_ppo.log)" in out


def test_demo_response_length_default_is_the_one_it_runs(loop_calls, capsys):
    """`--response-length` help said "default 32" while the recipe ran 48."""
    from verl_tor.tools.loop_demo import LOOP_RESPONSE_LENGTH

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"(default {LOOP_RESPONSE_LENGTH};" in " ".join(capsys.readouterr().out.split())
    assert main(["demo", "--steps", "1"]) == 0
    assert loop_calls[0]["env"]["MAX_RESPONSE_LENGTH"] == str(LOOP_RESPONSE_LENGTH) == "48"
    assert loop_calls[0]["env"]["OVERLONG_BUFFER"] == "12"  # the recipe's own DAPO buffer at 48


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "1"], "--n 1: a group of one response"),
        (["--response-length", "1"], "every reward is 0"),
        (["--response-length", "27"], "answers with a two-digit area take 28 tokens"),
        (["--algorithm", "dapo", "--n", "1"], "which drops groups whose rewards all agree, keeps every group of one"),
    ],
)
def test_demo_warns_about_settings_that_teach_nothing(argv, message, loop_calls, capsys):
    assert main(["demo", "--steps", "1", *argv]) == 0 and len(loop_calls) == 1
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and message in err, err


def test_default_demo_runs_without_warnings(loop_calls, capsys):
    assert main(["demo", "--steps", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_scorer_policy_ref_is_accepted_by_verls_trainer_demo(loop_calls, capsys):
    """The plain demo runs verl's trainer, whose GRPO recipe has a reference policy (its KL loss): `ref` is valid there
    (the composed config: tests/test_recipes_on_cpu.py); the walk-through and inspect have none and refuse it."""
    assert main(["demo", "--steps", "1", "tor.scorer_policy=ref"]) == 0
    assert "tor.scorer_policy=ref" in loop_calls[0]["overrides"]


def compose_demo(call: dict):
    """The config verl's main_ppo would compose for a recorded demo call (the recipe's dry run + hydra)."""
    from hydra import compose, initialize_config_dir

    from verl_tor.local.launch import recipe_command

    argv = recipe_command(
        call["recipe"], call["overrides"], cpu_dir=call["cpu_dir"], experiment=call["experiment"], env=call["env"]
    )
    assert argv[:3] == ["python3", "-m", "verl.trainer.main_ppo"], argv[:3]
    with initialize_config_dir(config_dir=argv[3].split("=", 1)[1], version_base=None):
        return compose(argv[4].split("=", 1)[1], overrides=argv[5:])


def test_demo_command_lines_run_what_the_flags_say(loop_calls):
    """What main_ppo would run for `demo tor.enable=false --algorithm dapo` (it ran stock GRPO), `demo --algorithm
    dapo`, `demo tor.scorer_policy=ref` and the sizes, composed through the recipe and hydra without running it."""
    import verl  # noqa: F401  - the plugin: the tor block
    from verl.trainer.ppo.utils import need_reference_policy

    from verl_tor.integration.trainer import validate_tor_config

    for argv in (["tor.enable=false", "--algorithm", "dapo"], ["--algorithm", "dapo"], ["tor.scorer_policy=ref"]):
        assert main(["demo", "--steps", "3", "--prompts", "2", "--n", "3", "--seed", "5", *argv]) == 0
    stock_dapo, tor_dapo, ref = (compose_demo(call) for call in loop_calls)
    for cfg in (stock_dapo, tor_dapo):
        assert cfg.algorithm.filter_groups.enable and cfg.reward.reward_manager.name == "dapo"
        assert cfg.actor_rollout_ref.actor.clip_ratio_high == 0.28 and not cfg.actor_rollout_ref.actor.use_kl_loss
    assert (stock_dapo.tor.enable, stock_dapo.trainer.v1.trainer_mode) == (False, "sync")
    assert (tor_dapo.tor.enable, tor_dapo.trainer.v1.trainer_mode) == (True, "tor_sync")
    assert ref.tor.scorer_policy == "ref" and not ref.algorithm.filter_groups.enable
    assert need_reference_policy(ref)  # GRPO's KL loss: verl starts a reference worker
    assert validate_tor_config(ref, use_reference_policy=True).scorer_policy == "ref"
    assert (ref.trainer.total_training_steps, ref.data.train_batch_size, ref.actor_rollout_ref.rollout.n) == (3, 2, 3)
    assert ref.data.seed == 6 and ref.data.max_response_length == 48
    assert ref.trainer.default_local_dir.endswith("/runs/grpo_tor-1")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import verl_tor.tools.loop_demo

    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(verl_tor.tools.loop_demo, "main", interrupted)
    assert main(["demo", "--steps", "1"]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "verl-tor: interrupted" and "Traceback" not in captured.err


def test_help_is_plain_text_and_a_closed_pipe_is_quiet():
    """`verl-tor --help` printed raw reStructuredText; `verl-tor docs | head` ended in a BrokenPipeError traceback
    (here deterministic: the pipe's reader is closed before the command writes)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "verl_tor.tools.cli"]
    help_text = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, check=True).stdout
    assert (
        "``" not in help_text
        and "verl-tor: the command line (demo, inspect, docs, check-config, config-path)" in help_text
    )
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([*cmd, "docs"], stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_dev_sh_demo_resolves_paths_against_the_callers_folder(tmp_path):
    """`cd /tmp && bash <repo>/scripts/dev.sh demo --out-dir rel_out` wrote into the checkout (dev.sh cds into it).
    Here with a stand-in venv (the stamp dev.sh checks, a `verl-tor` that prints its folder), so nothing installs."""
    import hashlib
    import subprocess

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, body in (("python", "exit 0"), ("verl-tor", 'echo "cwd=$PWD args=$*"')):
        (venv / "bin" / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (venv / "bin" / name).chmod(0o755)
    pins = b"".join((ROOT / f).read_bytes() for f in ("setup.cfg", "pyproject.toml", "constraints/cpu.txt"))
    (venv / ".verl_tor_stamp").write_text(hashlib.sha256(pins).hexdigest() + "\n")
    caller = tmp_path / "caller"
    caller.mkdir()
    env = {**os.environ, "VERL_TOR_VENV": str(venv)}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "dev.sh"), "demo", "--out-dir", "rel_out"],
        capture_output=True,
        text=True,
        env=env,
        cwd=caller,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"cwd={caller} args=demo --out-dir rel_out"


def test_every_one_step_walk_through_gets_a_fresh_folder(monkeypatch, tmp_path):
    import verl_tor.tools.demo

    seen = []
    monkeypatch.setattr(verl_tor.tools.demo, "main", lambda args, cfg: seen.append(args.out_dir) or 0)
    for _ in range(2):
        assert main(["demo", "--one-step", "--out-dir", str(tmp_path)]) == 0
    assert seen == [str(tmp_path / "one_step-1"), str(tmp_path / "one_step-2")]
