"""The sweep's search space and its selection rules, without training: parsing errors name the key, every corner
is validated before a trial starts, conditions hold in every sampled trial, and best/ follows the stated rule."""

from __future__ import annotations

import math

import optuna
import pytest

from deltatune.sweep import BestRule, SpaceError, check_space, choose_best, pareto_front, parse_space
from deltatune.task.config import ConfigError, set_key

BASE = {
    "model": {"path": "some/model", "task": "classification"},
    "data": {"train": "train.jsonl", "format": "classification"},
    "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
    "optim": {"lr": 1e-3},
    "training": {"max_steps": 10},
    "eval": {"metric": "accuracy"},
}
METHODS = {
    "presets": {
        "lora": {"adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query"]}},
        "dora": {"adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query"], "use_dora": True}},
        "ia3": {"adapter": {"method": "ia3", "target_modules": ["query"]}},
    }
}  # fmt: skip
GOOD = {
    "method": METHODS,
    "adapter.r": {"int": [1, 64], "log": True, "when": {"method": ["lora", "dora"]}},
    "optim.lr": {"float": [1e-4, 1e-2], "log": True},
    "training.batch_size": {"choices": [8, 16]},
}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"optim.lr": {"float": [1e-2, 1e-4]}}, "low 0.01 must be below high 0.0001"),
        ({"optim.lr": {"float": [0, 1e-2], "log": True}}, "a log range needs low > 0"),
        ({"optim.lr": {"float": [1e-4, 1e-2], "log": "yes"}}, "`log` must be true or false"),
        ({"adapter.r": {"int": [1.5, 8]}}, "`int` bounds must be whole numbers"),
        ({"adapter.r": {"int": [1, 8], "step": 2, "log": True}}, "`step` and `log: true` cannot be combined"),
        ({"adapter.r": {"int": [1, 8], "choices": [1, 2]}}, "give exactly one of choices, presets, int, float"),
        ({"adapter.r": {"range": [1, 8]}}, "unknown key(s) ['range']"),
        ({"adapter.r": 8}, "expected a mapping"),
        ({"training.batch_size": {"choices": []}}, "`choices` must be a non-empty list"),
        ({"training.batch_size": {"choices": [8, 8]}}, "lists a value twice"),
        ({"adapter.target_modules": {"choices": [["q"], ["v"]]}}, "is not a plain value"),
        ({"adapter.r": {"int": [1, 8], "when": {"method": ["lora"]}}}, "names 'method', which is not a parameter defined above"),
        ({"method": METHODS, "adapter.r": {"int": [1, 8], "when": {"method": ["lorax"]}}}, "'method' never takes ['lorax']"),
        ({"a.b": {"presets": {"x": {"optim.lr": 1}}}}, "a preset switch's name must not be a dotted config key"),
        ({"method": {"presets": {"x": 3}}}, "preset 'x' must map dotted config keys to values"),
        ([1, 2], "the top level must map parameter names to specs"),
    ],
)  # fmt: skip
def test_malformed_space_names_the_parameter_and_the_fix(spec, message):
    with pytest.raises(SpaceError) as err:
        parse_space(spec)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"optim.lrr": {"float": [1e-4, 1e-2]}}, "unknown key 'optim.lrr'"),  # a typo in a config key
        (
            {"optim.lr": {"float": [-1.0, 1e-2]}},
            "optim.lr: Input should be greater than 0",
        ),  # a value refused
        # a key that only some presets accept, without `when`: ia3 has no rank
        ({"method": METHODS, "adapter.r": {"int": [1, 8]}}, "unknown key(s) ['r'] in adapter (method ia3)"),
        ({"adapter.r": {"int": [0, 8]}}, "r must be a positive integer, got 0"),  # the method's own check
    ],
)
def test_every_corner_is_validated_before_the_first_trial(spec, named):
    with pytest.raises(SpaceError) as err:
        check_space(parse_space(spec), BASE, "space.yaml")
    assert named in str(err.value)
    assert str(err.value).startswith("space.yaml: the trial with ")


def test_a_good_space_checks_every_corner():
    # 3 presets x batch 2 choices x lr 2 ends, and the rank's 2 ends for the two presets that have it
    assert check_space(parse_space(GOOD), BASE) == (2 * 2 + 1) * 2 * 2


def test_conditions_hold_in_every_sampled_trial_and_values_land_in_the_chosen_section():
    space = parse_space(GOOD)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(40):
        trial = study.ask()
        chosen = space.sample(trial)
        seen.add(chosen["method"])
        assert ("adapter.r" in chosen) == (chosen["method"] in ("lora", "dora"))
        assert 1e-4 <= chosen["optim.lr"] <= 1e-2 and chosen["training.batch_size"] in (8, 16)
        raw = space.apply(BASE, chosen)
        adapter = raw["adapter"]
        assert adapter["method"] == ("ia3" if chosen["method"] == "ia3" else "lora")
        assert adapter.get("r") == chosen.get("adapter.r")  # the sampled rank, inside the preset's section
        assert adapter.get("use_dora", False) == (chosen["method"] == "dora")
        assert raw["optim"]["lr"] == chosen["optim.lr"]
        study.tell(trial, 0.0)
    assert seen == {"lora", "dora", "ia3"}
    assert BASE["adapter"]["r"] == 8  # apply() copies; the base config is untouched


def test_set_key_replaces_a_section_with_a_mapping_and_refuses_to_pass_through_a_value():
    tree = {"adapter": {"method": "lora", "r": 8}}
    set_key(tree, ["adapter"], {"method": "ia3"}, "x")
    set_key(tree, ["optim", "lr"], 0.1, "x")
    assert tree == {"adapter": {"method": "ia3"}, "optim": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="space parameter 'a': 'lr' is a value, not a section"):
        set_key(tree, ["optim", "lr", "x"], 1, "space parameter 'a'")


def _row(number, metric, size, state="complete"):
    return {"number": number, "state": state, "metric": metric, "adapter_bytes": size, "params": {}}


ROWS = [
    _row(0, 0.80, 1000),
    _row(1, 0.795, 100),  # within 0.01 of the top, and the smallest such
    _row(2, 0.79, 50),  # 0.01 below: outside a 0.005 tolerance, inside 0.01
    _row(3, 0.60, 10),
    _row(4, 0.70, 500),  # dominated by 1 (better and smaller)
    _row(5, 0.99, 1, state="pruned"),  # pruned and failed trials never count
    _row(6, math.nan, 1, state="failed"),
]


def test_best_rule_smallest_within_tolerance_top_and_loss():
    assert choose_best(ROWS, "max", BestRule("smallest", tolerance=0.005))["number"] == 1
    assert choose_best(ROWS, "max", BestRule("smallest", tolerance=0.01))["number"] == 2
    assert choose_best(ROWS, "max", BestRule("top"))["number"] == 0
    # loss: lower is better, so "within tolerance" means at most tolerance above the lowest
    losses = [_row(0, 0.30, 1000), _row(1, 0.305, 100), _row(2, 0.50, 1)]
    assert choose_best(losses, "min", BestRule("smallest", tolerance=0.01))["number"] == 1
    assert choose_best([_row(0, 0.5, 1, state="failed")], "max", BestRule()) is None


def test_pareto_front_keeps_only_undominated_complete_trials():
    assert [r["number"] for r in pareto_front(ROWS, "max", "adapter_bytes")] == [3, 2, 1, 0]
    ties = [_row(0, 0.8, 100), _row(1, 0.8, 100), _row(2, 0.8, 200)]  # equal trials don't dominate each other
    assert [r["number"] for r in pareto_front(ties, "max", "adapter_bytes")] == [0, 1]


def test_timeout_durations():
    import argparse

    from deltatune.cli.main import _duration

    assert [_duration(t) for t in ("90", "90s", "30m", "2h", "1h30m", "0.5h")] == [
        90,
        90,
        1800,
        7200,
        5400,
        1800,
    ]
    for bad in ("", "2d", "h", "1m2h"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a duration"):
            _duration(bad)


def test_parallel_trials_split_the_cores_and_take_one_gpu_each():
    from deltatune.sweep.trial import slot_env

    assert slot_env(0, jobs=1, cpus=16, gpus=8) == {}  # one trial at a time: it gets the whole machine
    assert slot_env(1, jobs=2, cpus=2, gpus=0) == {"OMP_NUM_THREADS": "1"}
    assert [slot_env(s, jobs=4, cpus=16, gpus=2)["CUDA_VISIBLE_DEVICES"] for s in range(4)] == [
        "0",
        "1",
        "0",
        "1",
    ]
    # a user's own device list is respected: slots go round it
    assert [slot_env(s, 3, 6, 2, visible="2,5")["CUDA_VISIBLE_DEVICES"] for s in range(3)] == ["2", "5", "2"]
    assert slot_env(0, jobs=8, cpus=4, gpus=0)["OMP_NUM_THREADS"] == "1"  # never zero threads


def _trial_row(number, metric, r, lr, state="complete"):
    return {"number": number, "state": state, "metric": metric, "params": {"adapter.r": r, "optim.lr": lr},
            "trainable_params": 1000 * r, "adapter_bytes": 4096 * r, "s_per_step": 0.01, "peak_rss_mib": 400.0,
            "duration_s": 1.0, "reason": None, "majority_baseline": {"label": "neg", "accuracy": 0.6}}  # fmt: skip


@pytest.mark.slow
def test_the_report_shows_the_majority_baseline_keeps_integers_and_plots_log_parameters_on_a_log_axis(
    tmp_path,
):
    """A trial at 0.6 accuracy on a split that is 60% one class learned nothing: the report says so; counts
    stay integers in trials.csv; a parameter sampled on a log scale gets a log axis."""
    import csv

    from deltatune.sweep.report import plot_params, write_reports

    rows = [
        _trial_row(0, 0.6, 2, 1e-4),
        _trial_row(1, 0.85, 8, 3e-3),
        _trial_row(2, 0.55, 4, 1e-3),
        _trial_row(3, None, 4, 2e-3, "failed"),
    ]
    write_reports(tmp_path, rows, params=["adapter.r", "optim.lr"], metric="accuracy", mode="max",
                  rule=BestRule(), header={"study": "s"}, log_scale={"optim.lr"})  # fmt: skip
    md = (tmp_path / "sweep.md").read_text()
    assert (
        "Majority-class baseline: accuracy 0.6 (always 'neg'); trials at it learned nothing accuracy shows: [0, 2]"
        in md
    )
    assert md.split("## All trials")[1].count("at the majority-class baseline") == 2  # trials 0 and 2
    with (tmp_path / "trials.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [t["trainable_params"] for t in table] == ["2000", "8000", "4000", "4000"]
    assert [t["at_majority_baseline"] for t in table] == ["True", "False", "True", "False"]
    fig = plot_params(rows, tmp_path / "p.png", metric="accuracy", params=["adapter.r", "optim.lr"],
                      log_scale={"optim.lr"})  # fmt: skip
    scales = {ax.get_xlabel(): ax.get_xscale() for ax in fig.axes}
    assert scales == {"adapter.r": "linear", "optim.lr": "log"}
    loss = write_reports(tmp_path / "loss", rows, params=["adapter.r"], metric="loss", mode="min",
                         rule=BestRule(), header={"study": "s"})  # fmt: skip
    assert loss is not None and "Majority-class" not in (tmp_path / "loss" / "sweep.md").read_text()


def test_majority_baseline_is_the_share_of_the_most_common_class():
    from deltatune.train.loop import majority_baseline

    assert majority_baseline({"neg": 30, "pos": 70}) == {"label": "pos", "accuracy": 0.7}
    assert majority_baseline({}) is None and majority_baseline(None) is None


PREFERENCE_BASE = {
    "model": {"path": "some/model", "task": "causal_lm"},
    "data": {"train": "pairs.jsonl", "format": "preference"},
    "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
    "optim": {"lr": 1e-3},
    "training": {"max_steps": 10},
    "eval": {"metric": "reward_accuracy"},
}


def test_objective_settings_are_searchable_and_a_setting_of_another_objective_is_named():
    space = {
        "training.objective": {"choices": ["dpo", "ipo", "simpo"]},
        "training.beta": {"float": [0.05, 2.5], "log": True},
        "training.simpo_gamma": {"float": [0.3, 1.5], "when": {"training.objective": ["simpo"]}},
    }
    # 3 objectives x 2 beta ends, and simpo's 2 gamma ends
    assert check_space(parse_space(space), PREFERENCE_BASE) == 2 * 2 + 2 * 2
    del space["training.simpo_gamma"]["when"]
    with pytest.raises(
        SpaceError, match="training.simpo_gamma belongs to objective simpo, not training.objective=dpo"
    ):
        check_space(parse_space(space), PREFERENCE_BASE)
