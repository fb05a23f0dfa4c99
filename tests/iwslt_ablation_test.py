"""The main job's ablation (examples/iwslt/ablation.py): what a point's
name means, the rates it tries, and how each stage is chosen from the
finished figures of the one before."""

import json
import pathlib

import pytest
from iwslt import ablation
from iwslt import settings

CHOICES = ("rec", "in+rec", "in+rec+dense", "all")


def parse(*argv):
    return settings.parse(["--data-dir", ".", *argv])[1]


def test_a_point_name_says_what_the_point_is():
    spec = settings.arm_spec("in+rec+dense_r16_dora_a2_d0.1")
    assert spec["method"] == "in+rec+dense_r16_dora_a2_d0.1"
    assert spec["targets"] == ("kernel", "recurrent", "dense")
    assert spec["config"] == {
        "rank": 16,
        "lora_targets": ("kernel", "recurrent", "dense"),
        "use_dora": True,
        "lora_alpha": 32.0,
        "lora_dropout": 0.1,
    }
    assert spec["variant"] == "dora" and spec["loraplus_ratio"] is None
    assert settings.arm_spec("rec_r8_loraplus")["loraplus_ratio"] == 16.0
    assert settings.arm_spec("all_r4_pissa")["config"]["lora_init"] == "pissa"
    assert settings.arm_spec("full") is settings.ARMS["full"]
    name = settings.ablation_point("rec", 8, "dora", 0.5, 0.3)
    assert name == "rec_r8_dora_a0.5_d0.3"
    assert settings.arm_spec(name)["config"]["lora_alpha"] == 4.0


@pytest.mark.parametrize(
    "name",
    ["nonsense", "rec", "rec_8", "rec_r0", "rec_rx", "rec_r8_x1", "x_r8"],
)
def test_a_name_that_is_no_arm_and_no_point_is_a_key_error(name):
    with pytest.raises(KeyError, match=name):
        settings.arm_spec(name)


def test_each_point_tries_its_own_grid():
    args = parse()
    assert settings.grid(args, "full") == settings.LEARNING_RATE_GRIDS["full"]
    assert (
        settings.grid(args, "rec_r16") == settings.LEARNING_RATE_GRIDS["lora"]
    )
    assert (
        settings.grid(args, "all_r8_pissa") == settings.VARIANT_GRIDS["pissa"]
    )
    smoke = parse("--smoke")
    assert settings.grid(smoke, "all_r2_pissa") == settings.SMOKE_GRIDS["lora"]


def finish(args, arm, validation):
    """Writes `arm`'s result for every ablation seed, ending at
    `validation` perplexity."""
    for seed in range(ablation.seeds(args)):
        folder = pathlib.Path(args.output_dir, "seeds", str(seed), arm)
        folder.mkdir(parents=True, exist_ok=True)
        row = {"validation": validation + seed}
        (folder / "result.json").write_text(
            json.dumps({"chunks": [{"forgetting_row": row}]})
        )


def test_each_stage_is_chosen_from_the_finished_one_before(tmp_path):
    args = parse("--output-dir", str(tmp_path))
    first = ablation.first_stage(args)
    assert first == [
        "rec_r4",
        "rec_r8",
        "rec_r16",
        "rec_r32",
        "rec_r64",
        "in+rec_r8",
        "in+rec+dense_r8",
        "all_r8",
    ]
    assert ablation.arm_of(args, "rec_r8") == "lora"
    assert ablation.arm_of(args, "in+rec_r8") == "lora_kernel"
    assert ablation.points(args) == first
    values = {
        "rec_r4": 66.0,
        "lora": 65.0,
        "rec_r16": 64.0,
        "rec_r32": 63.0,
        "rec_r64": 63.5,
        "lora_kernel": 62.0,
        "in+rec+dense_r8": 58.0,
        "all_r8": 59.0,
    }
    for arm, value in list(values.items())[:-1]:
        finish(args, arm, value)
    assert ablation.points(args) == first  # one point still running
    finish(args, "all_r8", values["all_r8"])
    variants = [
        "in+rec+dense_r8_dora",
        "in+rec+dense_r8_pissa",
        "in+rec+dense_r8_loraplus",
    ]
    assert ablation.points(args) == first + variants
    finish(args, variants[0], 60.0)
    finish(args, variants[1], 57.0)
    assert ablation.points(args) == first + variants
    finish(args, variants[2], 61.0)
    best = "in+rec+dense_r8_pissa"
    # Dropout is the cells' alone: at the best point of cell targets.
    last = [f"{best}_a0.5", f"{best}_a2", "in+rec_r8_d0.1", "in+rec_r8_d0.3"]
    assert ablation.points(args) == first + variants + last
    for point in last:
        finish(args, point, 70.0)
    assert ablation.points(args) == first + variants + last
    assert ablation.validation(args, best) == pytest.approx(57.5)  # 2 seeds
    # More seeds later: the same points (the choices are kept), more runs.
    more = parse("--output-dir", str(tmp_path), "--ablation-seeds", "3")
    assert ablation.validation(more, best) is None
    assert ablation.points(more) == first + variants + last


def test_a_diverged_point_ranks_last(tmp_path):
    args = parse("--output-dir", str(tmp_path))
    for arm in ("rec_r4", "rec_r16", "rec_r32", "rec_r64", "lora_kernel"):
        finish(args, arm, 70.0)
    finish(args, "lora", float("nan"))
    finish(args, "in+rec+dense_r8", 58.0)
    finish(args, "all_r8", 59.0)
    assert ablation.validation(args, "rec_r8") == float("inf")
    stage = ablation.points(args)[len(ablation.first_stage(args)) :]
    assert (
        stage
        == [
            "in+rec+dense_r8_dora",
            "all_r8_pissa",  # the best set of all for the variants it builds on
            "all_r8_loraplus",
        ][:0]
        + [p for p in stage]
    )  # the choice, whatever it is, is listed
    assert "rec_r8_dora" not in stage


def test_every_point_a_stage_can_choose_builds():
    """Every name the stages can produce, for every choice they can make,
    builds on a translator (DoRA never on an embedding, dropout only on
    the cells)."""
    import keras_rnn_lora
    from keras_rnn_lora.translation.model import build_translator

    args = parse()
    sets = [
        settings.ablation_point(t, args.rank) for t in settings.ABLATION_TARGETS
    ]
    names = set(ablation.first_stage(args))
    for variant in settings.ABLATION_VARIANTS:
        names |= {
            f"{p}_{variant}"
            for p in sets
            if settings.buildable(f"{p}_{variant}")
        }
    done = sorted(names)
    names |= {f"{p}_a{a:g}" for p in done for a in settings.ABLATION_ALPHAS}
    names |= {
        f"{p}_d{d:g}"
        for p in done
        if settings.buildable(f"{p}_d0.1")
        for d in settings.ABLATION_DROPOUTS
    }
    assert not settings.buildable("all_r8_dora")
    assert not settings.buildable("in+rec+dense_r8_d0.1")
    for name in sorted(names):
        config = dict(settings.arm_spec(name)["config"])
        config["rank"] = min(config["rank"], 4)  # a tiny model: same kinds
        model = build_translator(30, 30, embedding_dim=4, units=4)
        keras_rnn_lora.enable_lora(
            model, config=keras_rnn_lora.LoRAConfig(**config)
        )
