"""`domaintune sweep` on the tiny model: trials run, the best is picked by the objective, the study resumes,
a trial is pruned, best.yaml loads as an overlay; and the pieces (objective reader, prune hook, MLflow log)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.config import ConfigError, load_config
from domaintune.errors import UserError
from domaintune.workflow.sweep import Objective, PruneHook, eval_report_value, resolve_objective, run_sweep

TOPICS = ["fever", "cough", "insulin", "kidney", "asthma", "allergy", "migraine", "vitamin", "sleep", "diet"]


def _project(tmp_path: Path, sweep: dict, **train) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(40):
        a, b = rng.sample(TOPICS, 2)
        rows.append({"instruction": f"Patient {i} asks about {a}: what about {b}?", "input": "",
                     "output": f"For {a}, watch the {b}; rest and fluids."})  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    other = [{"instruction": f"Clinic {i}: is {t} treatable at home?", "input": "", "output": f"Mild {t} often is."}
             for i, t in enumerate(TOPICS)]  # fmt: skip
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other), encoding="utf-8")
    project = {
        "name": "tiny",
        "output_dir": "run",
        "model": {"name_or_path": "tiny-random-llama"},
        "data": {
            # other.jsonl: a source training never sees, held out whole as the `out_of_source` eval set
            "sources": [{"path": "qa.jsonl", "reader": "alpaca"}, {"path": "other.jsonl", "reader": "alpaca"}],
            "split": {"holdout_group": {"field": "source", "values": ["other"]}},
            "dedup": {"near": False},
            "filters": {"outlier_sigma": None},
            "decontaminate": {"enabled": False},
        },
        "train": {
            "method": "lora",
            "max_steps": 4,
            "eval_steps": 2,
            "save_steps": 2,
            "batch_size": 2,
            "max_length": 48,
            "precision": "fp32",
            "logging_steps": 2,
            "max_val_samples": 4,
            "tracking": "none",
            **train,
        },
        "eval": {
            "max_items": 3,
            "engine": "transformers",
            "decoding": {"max_new_tokens": 4, "batch_size": 4},
            "robustness": {"enabled": False},
            "bootstrap_samples": 100,
            "gates": [],
        },
        "sweep": sweep,
    }
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(project, allow_unicode=True), encoding="utf-8")
    return path


# The in-training metric pruned on is the val loss; trial 0 (a useful learning rate) finishes, trial 1 (a learning
# rate that cannot move the loss) has a higher val loss than the median at step 2 and is pruned there.
LOSS_SWEEP = {
    "search_space": {"train.learning_rate": {"type": "float", "low": 1e-8, "high": 5e-2, "log": True}},
    "objective": {"source": "eval", "set": "out_of_source", "metric": "perplexity", "direction": "minimize"},
    "pruning": {"metric": "loss", "n_startup_trials": 1},
    "enqueue": [{"train.learning_rate": 5e-2}, {"train.learning_rate": 1e-8}],
}


@pytest.mark.slow  # three trials with an eval stage each: about 40 s on 2 idle cores, minutes on a busy machine
def test_sweep_runs_prunes_resumes_and_writes_the_best_overlay(tmp_path):
    config = _project(tmp_path, LOSS_SWEEP)
    first = run_sweep(config, trials=2)
    sweep_dir = tmp_path / "run" / "sweep"
    assert [r.state for r in first.rows] == ["COMPLETE", "PRUNED"]
    assert first.ran == 2  # both were enqueued before they ran: queued trials are not counted as run
    assert first.rows[1].pruned_at == 2 and first.rows[1].params == {"train.learning_rate": 1e-8}
    assert first.rows[1].value is None and first.rows[1].intermediate[2] > first.rows[0].intermediate[2]
    # the pruned trial stopped in training: no model, no eval report
    assert not (sweep_dir / "trial_1" / "eval" / "report.json").exists()
    report = json.loads((sweep_dir / "trial_0" / "eval" / "report.json").read_text())
    # chosen by the held-out source, not by the test split of the training sources
    assert report["sets"]["out_of_source"]["kind"] == "out_of_source"
    assert first.rows[0].value == report["sets"]["out_of_source"]["metrics"]["tuned"]["perplexity"]
    assert first.rows[0].value != report["sets"]["test"]["metrics"]["tuned"]["perplexity"]
    assert first.best is not None and first.best.number == 0
    # the data stage ran once, in the sweep's cache, and the trials link to it
    assert len(list((sweep_dir / "data").iterdir())) == 1
    assert (sweep_dir / "trial_0" / "data").is_symlink() and (sweep_dir / "trial_1" / "data").is_symlink()
    for name in ("study.db", "trials.csv", "trials.png", "best.yaml"):
        assert (sweep_dir / name).is_file(), name

    second = run_sweep(config, trials=1)  # resumes the same study: one more trial, sampled by TPE's startup
    assert len(second.rows) == 3 and second.ran == 1
    assert [r.number for r in second.rows] == [0, 1, 2]
    assert second.rows[2].state in ("COMPLETE", "PRUNED")
    values = [r.value for r in second.rows if r.state == "COMPLETE"]
    assert second.best is not None and second.best.value == min(values)  # minimize: the lowest perplexity
    assert optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials[2].number == 2

    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best == {"train": {"learning_rate": second.best.params["train.learning_rate"]}}
    cfg = load_config(config, overlays=[sweep_dir / "best.yaml"])
    assert cfg.train.learning_rate == second.best.params["train.learning_rate"]
    assert cfg.train.max_steps == 4  # an overlay changes only what it names


def test_prune_hook_reports_and_prunes_below_the_median():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    objective = Objective("eval", "test", "chrf", "tuned", "maximize", "eval_chrf", 1.0, True)
    good = study.ask()
    PruneHook(good, objective)(2, {"eval_loss": 3.0, "eval_chrf": 40.0})
    study.tell(good, 40.0)
    same = study.ask()
    PruneHook(same, objective)(2, {"eval_loss": 3.0, "eval_chrf": 40.0})  # not worse than the median: goes on
    assert same.storage.get_trial(same._trial_id).intermediate_values == {2: 40.0}
    study.tell(same, 40.0)
    bad = study.ask()
    with pytest.raises(optuna.TrialPruned):
        PruneHook(bad, objective)(2, {"eval_loss": 3.0, "eval_chrf": 10.0})
    with pytest.raises(UserError, match="logged no eval_chrf"):
        PruneHook(study.ask(), objective)(4, {"eval_loss": 3.0})


def test_prune_sign_follows_the_study_direction(tmp_path):
    config = _project(tmp_path, LOSS_SWEEP)
    objective = resolve_objective(load_config(config))
    assert (objective.prune_key, objective.prune_sign) == ("eval_loss", 1.0)  # loss and perplexity both minimised
    gen = _project(
        tmp_path, {**LOSS_SWEEP, "pruning": {}, "objective": {"metric": "chrf"}}, generation_eval={"items": 2}
    )
    objective = resolve_objective(load_config(gen))
    # maximise chrf; generation_eval scores eval.primary_metric (rougeL_char), higher is better
    assert (objective.prune_key, objective.prune_sign, objective.metric) == ("eval_rougeL_char", 1.0, "chrf")
    minimise = _project(tmp_path, {**LOSS_SWEEP, "pruning": {}}, generation_eval={"items": 2})
    assert resolve_objective(load_config(minimise)).prune_sign == -1.0


def test_eval_report_reader_reads_both_shapes_and_names_what_is_there():
    flat = {"metrics": {"test": {"tuned": {"chrf": 31.5}}}, "deltas": {"test": {"tuned": {"chrf": {"delta": 2.5}}}}}
    assert eval_report_value(flat, "test", "tuned", "chrf", Path("r.json")) == 31.5
    assert eval_report_value(flat, "test", "tuned", "chrf_delta", Path("r.json")) == 2.5
    deltas = {"tuned": {"chrf": {"delta": -1.0, "ci_low": -3.0, "ci_high": 0.5}}}
    per_set = {"sets": {"ood": {"metrics": {"tuned": {"chrf": 12.0}}, "deltas": deltas}}}
    assert eval_report_value(per_set, "ood", "tuned", "chrf_delta_ci_low", Path("r.json")) == -3.0
    assert eval_report_value(per_set, "ood", "tuned", "chrf", Path("r.json")) == 12.0
    assert eval_report_value(per_set, "ood", "tuned", "chrf_delta", Path("r.json")) == -1.0
    with pytest.raises(UserError, match=r"r.json: no chrf of model 'tuned' on set 'other' \(sets in the report: ood\)"):
        eval_report_value(per_set, "other", "tuned", "chrf", Path("r.json"))


def test_the_plot_baseline_is_the_base_models_score_where_one_compares(tmp_path):
    from domaintune.layout import RunLayout
    from domaintune.workflow.sweep import read_baseline

    layout = RunLayout(tmp_path)
    layout.eval_report.parent.mkdir(parents=True)
    report = {"sets": {"ood": {"metrics": {"base": {"chrf": 9.5}, "tuned": {"chrf": 12.0}}}}}
    layout.eval_report.write_text(json.dumps(report), encoding="utf-8")

    def objective(source: str, metric: str, model: str = "tuned") -> Objective:
        return Objective(source, "ood", metric, model, "maximize", "eval_loss", -1.0, False)

    assert read_baseline(layout, objective("eval", "chrf")) == 9.5
    assert read_baseline(layout, objective("eval", "chrf_delta")) is None  # a gain is already against the base
    assert read_baseline(layout, objective("eval", "chrf", model="base")) is None
    assert read_baseline(layout, objective("train_generation_eval", "chrf")) is None
    report["sets"]["ood"]["metrics"].pop("base")  # eval.models without the base: no line, not an error
    layout.eval_report.write_text(json.dumps(report), encoding="utf-8")
    assert read_baseline(layout, objective("eval", "chrf")) is None


def test_the_plot_draws_one_base_line_or_the_base_per_trial(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from domaintune.workflow.sweep_report import TrialRow, write_trials_plot

    drawn: list[list[str]] = []
    close = plt.close
    monkeypatch.setattr(
        plt, "close", lambda fig: drawn.append(fig.axes[0].get_legend_handles_labels()[1]) or close(fig)
    )
    rows = [TrialRow(0, "COMPLETE", 12.0, {}, baseline=10.0), TrialRow(1, "COMPLETE", 13.0, {}, baseline=10.0)]
    write_trials_plot(rows, tmp_path / "same.png", "x", "maximize")
    rows[1].baseline = 11.0  # e.g. a searched decoding: the base answers differently in trial 1
    write_trials_plot(rows, tmp_path / "differs.png", "x", "maximize")
    write_trials_plot([TrialRow(0, "COMPLETE", 12.0, {})], tmp_path / "none.png", "x", "maximize")
    assert sorted(drawn[0]) == ["base model (10)", "best so far", "trial"]  # one dashed line
    assert sorted(drawn[1]) == ["base model", "best so far", "trial"]  # a mark per trial
    assert sorted(drawn[2]) == ["best so far", "trial"]
    assert all((tmp_path / name).is_file() for name in ("same.png", "differs.png", "none.png"))


def test_bad_search_spaces_fail_before_any_trial(tmp_path):
    bad_value = _project(tmp_path, {"search_space": {"train.lora.r": {"type": "categorical", "choices": [8, 0]}}})
    with pytest.raises(ConfigError, match=r"sweep.search_space.train.lora.r: the value 0 does not load"):
        run_sweep(bad_value, trials=1)
    with pytest.raises(ConfigError, match="search_space key 'name'"):
        load_config(_project(tmp_path, {"search_space": {"name": {"type": "categorical", "choices": ["a"]}}}))
    with pytest.raises(ConfigError, match="needs `low` <= `high`"):
        load_config(_project(tmp_path, {"search_space": {"train.epochs": {"type": "float", "low": 2, "high": 1}}}))
    with pytest.raises(ConfigError, match=r"enqueue\[0\]: give a value for every search_space key; missing"):
        load_config(_project(tmp_path, {**LOSS_SWEEP, "enqueue": [{}]}))
    with pytest.raises(ConfigError, match=r"needs train\.generation_eval\.items > 0"):
        run_sweep(_project(tmp_path, {**LOSS_SWEEP, "objective": {"source": "train_generation_eval"}}), trials=1)
    assert not (tmp_path / "run" / "sweep" / "study.db").exists()


def test_a_changed_objective_needs_a_new_study(tmp_path):
    from domaintune.workflow.sweep import open_study
    from domaintune.workflow.sweep_report import SweepPaths

    cfg = load_config(_project(tmp_path, LOSS_SWEEP))
    paths = SweepPaths(tmp_path / "sweep")
    paths.root.mkdir()
    study, _ = open_study(cfg, paths, resolve_objective(cfg))
    assert [t.system_attrs["fixed_params"] for t in study.get_trials()] == [
        {"train.learning_rate": 5e-2},
        {"train.learning_rate": 1e-8},
    ]
    other = cfg.model_copy(
        update={
            "sweep": cfg.sweep.model_copy(
                update={"objective": cfg.sweep.objective.model_copy(update={"metric": "chrf", "direction": "maximize"})}
            )
        }
    )
    with pytest.raises(
        UserError, match=r"optimises minimize out_of_source\.tuned\.perplexity, not maximize out_of_source\.tuned\.chrf"
    ):
        open_study(other, paths, resolve_objective(other))


def test_overlay_merges_nested_and_dotted_keys(tmp_path):
    config = _project(tmp_path, {})
    overlay = tmp_path / "best.yaml"
    overlay.write_text("train:\n  lora.r: 4\n  learning_rate: 0.001\ndata.sources.0.reader: jsonl\n")
    cfg = load_config(config, ["train.learning_rate=0.002"], overlays=[overlay])
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.learning_rate) == (4, 16, 0.002)  # --set wins
    assert cfg.data.sources[0].reader == "jsonl"
    # a sweep section in an overlay: search_space keys are dotted paths, kept whole
    overlay.write_text("sweep:\n  search_space:\n    train.lora.r: {type: categorical, choices: [2, 4]}\n")
    cfg = load_config(config, overlays=[overlay])
    assert list(cfg.sweep.search_space) == ["train.lora.r"] and cfg.sweep.search_space["train.lora.r"].choices == [2, 4]
    overlay.write_text("train:\n  lora: {rank: 4}\n")
    with pytest.raises(
        ConfigError, match=r"(?s)project.yaml \+ .*best.yaml: 1 invalid setting.*train.lora.rank: unknown key"
    ):
        load_config(config, overlays=[overlay])


def test_mlflow_logger_records_each_trial(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from domaintune.workflow.sweep_report import SweepPaths, mlflow_trial_logger

    cfg = load_config(_project(tmp_path, LOSS_SWEEP))
    paths = SweepPaths(tmp_path / "sweep")
    paths.root.mkdir()
    logger = mlflow_trial_logger(cfg, paths, "test.tuned.perplexity", cfg.sweep.search_space)
    study = optuna.create_study(direction="minimize")

    def objective(trial):
        lr = trial.suggest_float("train.learning_rate", 1e-5, 1e-3, log=True)
        trial.report(2.0, 2)
        trial.set_user_attr("folder", f"trial_{trial.number}")
        return lr * 1000

    study.optimize(objective, n_trials=2, callbacks=[logger])
    client = MlflowClient(tracking_uri=f"sqlite:///{paths.mlflow_db}")
    runs = client.search_runs([client.get_experiment_by_name("tiny-sweep").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"trial_0", "trial_1"}
    run = by_name["trial_1"]
    assert run.data.metrics["objective"] == pytest.approx(study.trials[1].value)
    assert float(run.data.params["train.learning_rate"]) == pytest.approx(study.trials[1].params["train.learning_rate"])
    assert run.data.tags["state"] == "COMPLETE" and run.data.tags["folder"] == "trial_1"


def test_cli_sweep_on_the_in_training_metric_with_list_choices(tmp_path):
    sweep = {
        "search_space": {
            "train.lora.target_modules": {"type": "categorical", "choices": [["q_proj", "v_proj"], "all-linear"]},
            "train.lora.r": {"type": "int", "low": 2, "high": 4, "step": 2},
        },
        "objective": {"source": "train_generation_eval"},
        "pruning": {"enabled": False},
    }
    config = _project(tmp_path, sweep, generation_eval={"items": 2, "max_new_tokens": 3})
    args = ["sweep", str(config), "--trials", "1", "--set", "train.max_steps=2"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "1 trial(s) this run, 1 in the study" in first.output
    result = CliRunner().invoke(app, args)  # the same study continues
    assert result.exit_code == 0, result.output
    assert "1 trial(s) this run, 2 in the study" in result.output
    assert "sweep: train rougeL_char" in result.output and "best: trial" in result.output
    assert "--overlay" in result.output and "best.yaml" in result.output
    sweep_dir = tmp_path / "run" / "sweep"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        metrics = json.loads((sweep_dir / f"trial_{trial.number}" / "train" / "metrics.json").read_text())
        # the list choice travelled through Optuna as JSON text and reached the config as a list
        assert metrics["config"]["lora"]["target_modules"] == json.loads(trial.params["train.lora.target_modules"])
        assert metrics["config"]["lora"]["r"] == trial.params["train.lora.r"] and metrics["steps"] == 2
        assert trial.value == metrics["generation_eval"]["curve"][-1][1]
        assert not (sweep_dir / f"trial_{trial.number}" / "eval").exists()  # the objective needs no eval stage
    best = max(study.trials, key=lambda t: t.value)
    overlay = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert overlay["train"]["lora"] == {
        "target_modules": json.loads(best.params["train.lora.target_modules"]),
        "r": best.params["train.lora.r"],
    }
    bad = CliRunner().invoke(app, ["sweep", str(config), "--set", "sweep.search_space={}"])
    assert bad.exit_code == 2 and "sweep.search_space is empty" in bad.output


def test_a_trial_left_running_by_a_killed_sweep_is_queued_again_in_its_folder(tmp_path):
    from optuna.trial import TrialState

    from domaintune.workflow.sweep import open_study
    from domaintune.workflow.sweep_report import SweepPaths

    cfg = load_config(_project(tmp_path, {**LOSS_SWEEP, "enqueue": []}))
    paths = SweepPaths(tmp_path / "sweep")
    paths.root.mkdir()
    study, notes = open_study(cfg, paths, resolve_objective(cfg))
    killed = study.ask()
    killed.suggest_float("train.learning_rate", 1e-8, 5e-2, log=True)
    killed.set_user_attr("folder", str(paths.trial_dir(0)))
    assert notes == []
    study, notes = open_study(cfg, paths, resolve_objective(cfg))  # the next invocation
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.system_attrs["fixed_params"] == first.params
    assert retry.user_attrs == {"folder": str(paths.trial_dir(0)), "retry_of": 0}
    assert notes == [f"trial 0 was interrupted: queued again in {paths.trial_dir(0)}"]


def _with(config: Path, data_split: dict | None = None, gates: list[str] | None = None) -> Path:
    """The project with data.split.holdout_group keys added and eval.gates replaced."""
    project = yaml.safe_load(config.read_text(encoding="utf-8"))
    project["data"]["split"]["holdout_group"].update(data_split or {})
    project["eval"]["gates"] = gates or []
    config.write_text(yaml.safe_dump(project, allow_unicode=True), encoding="utf-8")
    return config


def test_an_objective_set_that_a_gate_reads_is_refused_before_any_trial(tmp_path):
    from domaintune.workflow.sweep import check_objective_set

    gated = _with(_project(tmp_path, LOSS_SWEEP), gates=["sets.out_of_source.perplexity_delta < 0"])
    with pytest.raises(
        ConfigError,
        match=r"(?s)sweep.objective.set 'out_of_source' is read by the gate 'sets.out_of_source.perplexity_delta < 0' "
        r"\(eval.gates\).*winner's curse.*use out_of_source_dev \(data.split.holdout_group.dev_rows\) or val rows "
        r"via eval.sets file:.*allow_gated_set: true",
    ):
        run_sweep(gated, trials=1)
    assert not (tmp_path / "run" / "sweep").exists()  # nothing ran, no study was made

    def check(sweep: dict, gates: list[str], **split) -> None:
        cfg = load_config(_with(_project(tmp_path, sweep), split, gates))
        check_objective_set(cfg, resolve_objective(cfg), "p.yaml")

    on_test = {**LOSS_SWEEP, "objective": {"source": "eval", "set": "test", "metric": "chrf"}}
    for gate, objective in [
        ("perplexity_delta < 0", on_test),  # un-prefixed names read `test`
        ("tuned.chrf > 0", on_test),
        ("out_of_source.tuned.chrf > 0", LOSS_SWEEP),  # the older per-set prefix
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"is read by the gate '{gate}'")):
            check(objective, [gate])
    # gates on other sets, or the retention ratio (the general set), leave the objective's set alone
    check(LOSS_SWEEP, ["perplexity_delta < 0", "retention >= 0.9", "sets.test.chrf_delta > 0"])
    check(
        {**LOSS_SWEEP, "objective": {**LOSS_SWEEP["objective"], "allow_gated_set": True}},
        ["sets.out_of_source.perplexity_delta < 0"],
    )
    # the dev rows of the holdout: chosen on, while the gate reads the rest
    dev = {**LOSS_SWEEP, "objective": {**LOSS_SWEEP["objective"], "set": "out_of_source_dev"}}
    check(dev, ["sets.out_of_source.perplexity_delta < 0"], dev_rows=4)
    with pytest.raises(
        ConfigError, match=r"'out_of_source_dev': no data.split.holdout_group writes it: set .*dev_rows"
    ):
        check(dev, [])
    with pytest.raises(ConfigError, match=re.escape("is read by the gate 'sets.out_of_source_dev.chrf_delta > 0'")):
        check(dev, ["sets.out_of_source_dev.chrf_delta > 0"], dev_rows=4)


@pytest.mark.slow  # one trial with an eval stage: about 15 s on 2 idle cores
def test_a_sweep_chooses_on_the_dev_rows_while_the_gate_reads_the_rest(tmp_path):
    sweep = {**LOSS_SWEEP, "objective": {**LOSS_SWEEP["objective"], "set": "out_of_source_dev"}, "enqueue": []}
    config = _with(_project(tmp_path, sweep), {"dev_rows": 4}, ["sets.out_of_source.perplexity_delta < 100"])
    result = run_sweep(config, trials=1)
    [row] = result.rows
    trial = tmp_path / "run" / "sweep" / "trial_0"
    report = json.loads((trial / "eval" / "report.json").read_text())
    assert row.value == report["sets"]["out_of_source_dev"]["metrics"]["tuned"]["perplexity"]
    # the base's score on the same rows: the reference line in trials.png
    assert row.baseline == report["sets"]["out_of_source_dev"]["metrics"]["base"]["perplexity"] != row.value
    assert (tmp_path / "run" / "sweep" / "trials.png").is_file()
    assert report["sets"]["out_of_source_dev"]["n_items"] == 4 and report["sets"]["out_of_source"]["n_items"] == 6
    dev = {json.loads(line)["id"] for line in (trial / "data" / "holdout_out_of_source_dev.jsonl").open()}
    gated = {json.loads(line)["id"] for line in (trial / "data" / "holdout_out_of_source.jsonl").open()}
    assert len(dev) == 4 and not dev & gated


@pytest.mark.slow  # three trials with an eval stage each: about 40 s on 2 idle cores
def test_later_trials_read_the_base_answers_of_the_first_unless_the_decoding_changes(tmp_path, monkeypatch):
    from collections import Counter

    from domaintune.eval.models import EvalModel

    generated: list[Counter[str]] = [Counter()]  # one per trial: on_trial opens the next
    generate = EvalModel.generate

    def counting(self, prompts, *args, **kwargs):
        generated[-1][self.name] += len(prompts)
        return generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(EvalModel, "generate", counting)
    sweep = {
        "search_space": {
            "train.learning_rate": {"type": "float", "low": 1e-4, "high": 5e-2, "log": True},
            "eval.decoding.max_new_tokens": {"type": "categorical", "choices": [4, 3]},
        },
        "objective": {"source": "eval", "set": "out_of_source", "metric": "perplexity", "direction": "minimize"},
        "pruning": {"enabled": False},
        "enqueue": [
            {"train.learning_rate": 5e-2, "eval.decoding.max_new_tokens": 4},
            {"train.learning_rate": 1e-4, "eval.decoding.max_new_tokens": 4},
            {"train.learning_rate": 1e-4, "eval.decoding.max_new_tokens": 3},
        ],
    }
    config = _project(tmp_path, sweep, max_steps=2)
    result = run_sweep(config, trials=3, on_trial=lambda row: generated.append(Counter()))
    generated.pop()  # the counter opened after the last trial
    assert [r.state for r in result.rows] == ["COMPLETE"] * 3
    sweep_dir = tmp_path / "run" / "sweep"
    reports = [json.loads((sweep_dir / f"trial_{n}" / "eval" / "report.json").read_text()) for n in range(3)]
    assert generated[0]["base"] > 0 and generated[0]["tuned"] == generated[0]["base"]
    # trial 1: the base model answered nothing (its answers and perplexities are trial 0's), the tuned one did
    assert generated[1]["base"] == 0 and generated[1]["tuned"] == generated[0]["tuned"]
    assert reports[1]["cache"]["shared_base_rows"] > 0 and reports[0]["cache"]["shared_base_rows"] == 0
    for set_name in ("test", "out_of_source"):
        assert reports[1]["metrics"][set_name]["base"] == reports[0]["metrics"][set_name]["base"]
    # trial 2 decodes differently: the base model answers again
    assert generated[2]["base"] == generated[0]["base"] and reports[2]["cache"]["shared_base_rows"] == 0
    assert len(list((sweep_dir / "shared_eval").iterdir())) == 2


def test_an_interrupted_sweep_still_writes_the_finished_trials_report(tmp_path, monkeypatch):
    from domaintune.workflow import sweep as sweep_module

    sweep = {
        "search_space": {"train.lora.r": {"type": "int", "low": 2, "high": 4, "step": 2}},
        "objective": {"source": "train_generation_eval"},
        "pruning": {"enabled": False},
    }
    config = _project(tmp_path, sweep, generation_eval={"items": 2, "max_new_tokens": 3})
    real_call = sweep_module.TrialRunner.__call__
    calls = []

    def interrupted_second(self, trial):
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second trial
        return real_call(self, trial)

    monkeypatch.setattr(sweep_module.TrialRunner, "__call__", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, ["train.max_steps=2"], trials=3)
    sweep_dir = tmp_path / "run" / "sweep"
    overlay = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(finished) == 1 and overlay["train"]["lora"]["r"] == finished[0].params["train.lora.r"]
    assert (sweep_dir / "trials.csv").read_text().count("COMPLETE") == 1 and (sweep_dir / "trials.png").is_file()


@pytest.mark.parametrize("overlay", sorted((Path(__file__).parents[2] / "examples" / "sweeps").glob("*.yaml")), ids=str)
def test_the_shipped_sweep_overlays_load_over_their_examples(overlay):
    from domaintune.workflow.sweep import check_objective_set, check_search_space

    example = overlay.parents[1] / overlay.name
    cfg = load_config(example, overlays=[overlay])
    objective = resolve_objective(cfg)
    check_objective_set(cfg, objective, "shipped overlay")  # chooses on dev rows that no gate reads
    assert objective.set.endswith("_dev") and cfg.data.split.holdout_group.dev_rows
    check_search_space(example, [], [overlay], None, cfg.sweep.search_space)  # every bound loads as a config
    assert cfg.sweep.enqueue, "the example's own recipe is the first trial"
