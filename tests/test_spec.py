"""The job-spec schema: every spec in jobs/ validates; bad specs fail naming the file and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from biomedgpt.spec import JobSpec, SpecError, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo" / "vqa_rad.yaml"


@pytest.mark.parametrize("path", sorted((REPO / "jobs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_job_spec_validates(path):
    from biomedgpt.spec import ServeAppSpec

    spec = load_spec(path)
    assert isinstance(spec, ServeAppSpec if spec.kind == "serve" else JobSpec)
    assert spec.source == str(path)


def test_demo_spec_fields():
    spec = load_spec(DEMO)
    assert spec.kind == "finetune" and spec.trainer.workers == 2 and spec.trainer.strategy == "fsdp"
    assert spec.trainer.lr == 1e-3 and spec.model.size == "demo"
    assert spec.run_dir == "runs/demo/runs/demo/demo-vqa-rad"


def edited(**changes):
    data = yaml.safe_load(DEMO.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return data


@pytest.mark.parametrize("changes, message", [
    (dict(trainer__max_stpes=3), "my.yaml: trainer.max_stpes: unknown field (did you mean 'max_steps'?)"),
    (dict(trainer__batch_size="eight"), "my.yaml: trainer.batch_size: expected an integer, got 'eight'"),
    (dict(trainer__strategy="zero3"), "my.yaml: trainer.strategy: expected one of 'auto', 'fsdp', 'ddp', got 'zero3'"),
    (dict(trainer__lr=-1), "my.yaml: trainer.lr: must be > 0"),
    (dict(model__size="huge"), "my.yaml: model.size: 'huge' is not a named size"),
    (dict(model__image_size=100), "my.yaml: model.image_size: must be a multiple of 16"),
    (dict(data__train=[{"dataset": "vqa_rad", "splt": "train"}]), "my.yaml: data.train[0].splt: unknown field"),
    (dict(kind=KeyError), "my.yaml: kind: required field is missing"),
    (dict(name="Demo Run"), "my.yaml: name: 'Demo Run' must be lower-case"),
    (dict(model__tokenizer={"path": "x", "train_vocab_size": 500}), "my.yaml: model.tokenizer: give exactly one of"),
    (dict(data=KeyError), "my.yaml: data: required for kind 'finetune'"),
])
def test_bad_specs_name_file_and_field(changes, message):
    with pytest.raises(SpecError) as err:
        spec_from_dict(edited(**changes), "my.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_yaml_scientific_notation_is_a_number():
    data = edited(trainer__lr="5e-5")  # YAML 1.1 reads 5e-5 as a string
    assert spec_from_dict(data, "x.yaml").trainer.lr == 5e-5


def test_run_with_a_mistyped_spec_exits_2_before_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("max_steps:", "max_stepz:"))
    out = subprocess.run([sys.executable, "-m", "biomedgpt.cli", "run", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert f"{bad}: trainer.max_stepz: unknown field (did you mean 'max_steps'?)" in out.stderr
    assert "ray" not in out.stderr.lower().replace("biomedgpt run", "")


# ----------------------------------------------------------------------------------------------
# The recipe fields (pretraining and fine-tuning): jobs/pretrain/, jobs/finetune/
# ----------------------------------------------------------------------------------------------

FINETUNE = sorted((REPO / "jobs" / "finetune").glob("*.yaml"))
PRETRAIN = sorted((REPO / "jobs" / "pretrain").glob("*.yaml"))


def downstream_datasets() -> list[str]:
    """The datasets fine-tuned on, from datasets_spec/ (their stages): every one needs a recipe."""
    from biomedgpt.data.dataset_spec import load_dataset_specs

    return sorted(n for n, s in load_dataset_specs(REPO / "datasets_spec").items() if "finetune" in s.stages)


def test_one_finetune_spec_per_downstream_dataset_with_its_datasets_task():
    downstream = downstream_datasets()
    assert {"seer", "trec_2022", "vqa_rad", "mednli", "pathmnist"} <= set(downstream)  # the list is not empty
    assert sorted(p.stem for p in FINETUNE) == downstream
    for path in FINETUNE:
        spec = load_spec(path)
        ds = yaml.safe_load((REPO / "datasets_spec" / f"{path.stem}.yaml").read_text())
        assert [r.dataset for r in spec.data.train] == [path.stem]
        assert spec.kind == "finetune" and spec.data.task == ds["task"], path
        assert spec.model.init and spec.model.tokenizer.path and spec.trainer.epochs and spec.trainer.max_steps is None


@pytest.mark.parametrize("task, settings", [
    # the reference table of tests/fixtures/reference/biomedgpt.md
    ("vqa", dict(lr=5e-5, epochs=100, warmup_ratio=0.04, label_smoothing=0.1, clip_grad_norm=1.0,
                 freeze_token_embeddings=True, label_smoothing_candidates=True)),
    ("caption", dict(lr=1e-5, warmup_ratio=0.06)),
    ("classify", dict(lr=5e-5, epochs=5, label_smoothing_candidates=True)),
    ("nli", dict(lr=7e-5, label_smoothing_candidates=True)),
])
def test_finetune_specs_carry_the_official_settings(task, settings):
    specs = [s for s in map(load_spec, FINETUNE) if s.data.task == task]
    assert specs
    for spec in specs:
        for key, value in settings.items():
            assert getattr(spec.trainer, key) == value, (spec.source, key)
        if task == "vqa":
            assert spec.trainer.ema.enabled and spec.trainer.ema.decay == 0.9999
            assert spec.model.image_size == 384  # base size
        if task == "caption":
            assert spec.model.image_size == 480 and spec.trainer.drop_worst_ratio > 0
        if task == "classify":
            assert spec.model.image_size == 384
        if task == "nli":
            assert spec.data.max_source_length == 512
    for spec in (s for s in map(load_spec, FINETUNE) if s.data.task == "summarize"):
        assert (spec.data.max_source_length, spec.data.max_target_length) == (512, 128) and spec.trainer.decoder_noise > 0


#: The reference classification fine-tuning's augmentation (OFA/BiomedGPT image_classify_dataset: timm
#: create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel")).
OFFICIAL_AUGMENT = {"random_resized_crop": {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]}, "hflip": 0.5,
                    "randaugment": {"n": 2, "m": 9.0, "mstd": 0.5, "ops": None}, "random_erasing": 0.25}


def image_classification(spec) -> bool:
    """A classification recipe whose datasets have images (a text-only dataset's prompt reads {text})."""
    if spec.data.task != "classify":
        return False
    prompts = [yaml.safe_load((REPO / "datasets_spec" / f"{r.dataset}.yaml").read_text())["prompt"]["instruction"]
               for r in spec.data.train]
    return not all("{text}" in p for p in prompts)


def test_every_image_classification_recipe_sets_randaugment():
    """RandAugment (and the rest of the reference's training transform) in every image-classification
    recipe; a classification spec without it fails here."""
    specs = [s for s in map(load_spec, FINETUNE) if s.data.task == "classify"]
    image = [s for s in specs if image_classification(s)]
    assert len(image) >= 16 and {s.data.train[0].dataset for s in specs} - {s.data.train[0].dataset for s in image} \
        == {"seer"}
    for spec in image:
        assert spec.data.augment.to_config() == OFFICIAL_AUGMENT, spec.source
    bare = spec_from_dict(dict(yaml.safe_load(FINETUNE[0].read_text())), "x.yaml")
    assert bare.data.task == "classify"  # bloodmnist
    data = yaml.safe_load(FINETUNE[0].read_text())
    del data["data"]["augment"]
    assert spec_from_dict(data, "x.yaml").data.augment.to_config() != OFFICIAL_AUGMENT


def test_pretrain_specs_reproduce_the_official_recipe():
    assert [p.stem for p in PRETRAIN] == ["base", "medium", "small"]
    sources = {"iu_xray", "peir_gross", "medicat", "pathvqa", "slake", "deeplesion", "oia_ddr", "chexpert_small",
               "cytoimagenet", "isic_2020", "retinal_fundus", "mimic_iii_notes", "ncbi_bionlp", "pubmed_abstracts"}
    for path in PRETRAIN:
        spec = load_spec(path)
        t = spec.trainer
        assert spec.kind == "pretrain" and spec.model.size == path.stem and spec.data.task == "pretrain"
        assert {r.dataset for r in spec.data.train} == sources
        assert (t.lr, t.epochs, t.workers, t.clip_grad_norm, t.precision) == (5e-5, 20, 10, 5.0, "bf16-mixed")
        assert spec.model.image_size == 256 and spec.data.max_source_length == 80
        # per 8 image-text rows: 2 text, 1 image, 1 detection (the batch: 16 image-text rows + their extras)
        assert spec.data.group_ratios == {"text": 0.25, "image": 0.125, "detection": 0.125}
        assert t.batch_size == 16 + 4 + 2 + 2


def test_every_recipe_is_admitted_for_its_team_on_the_cluster():
    """cluster/tenants.yaml grants each recipe's team every dataset it reads (the credentialed ones
    through a credential the team holds) and the storage it writes."""
    from biomedgpt.tenancy import admit, load_tenants

    tenants = load_tenants()
    for path in FINETUNE + PRETRAIN:
        admit(load_spec(path), tenants, on_cluster=True)


@pytest.mark.parametrize("changes, message", [
    (dict(trainer__epochs=3), "my.yaml: trainer.epochs: give max_steps or epochs, not both"),
    (dict(trainer__max_steps=KeyError), "my.yaml: trainer.max_steps: how long to train: give max_steps or epochs"),
    (dict(trainer__epochs=0, trainer__max_steps=KeyError), "my.yaml: trainer.epochs: must be > 0"),
    (dict(trainer__ema={"enabled": True, "decay": 1.5}), "my.yaml: trainer.ema.decay: must be in (0, 1)"),
    (dict(trainer__ema={"enabld": True}), "my.yaml: trainer.ema.enabld: unknown field (did you mean 'enabled'?)"),
    (dict(trainer__drop_worst_ratio=1.0), "my.yaml: trainer.drop_worst_ratio: must be in [0, 1)"),
    (dict(trainer__decoder_noise=-0.1), "my.yaml: trainer.decoder_noise: must be in [0, 1)"),
    (dict(trainer__freeze_token_embeddings="yes"), "my.yaml: trainer.freeze_token_embeddings: expected true or false"),
    (dict(data__task="vqa2"), "my.yaml: data.task: 'vqa2' is not a task family"),
    (dict(data__train=[{"dataset": "vqa_rad", "group": "text"}]),
     "my.yaml: data.train[0].group: 'text' has no ratio in data.group_ratios"),
    (dict(data__group_ratios={"text": 0.25}), "my.yaml: data.group_ratios.text: no training dataset is in group 'text'"),
])
def test_bad_recipe_fields_name_file_and_field(changes, message):
    with pytest.raises(SpecError) as err:
        spec_from_dict(edited(**changes), "my.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_task_null_means_each_records_own_task():
    spec = spec_from_dict(edited(data__task=None), "x.yaml")
    assert spec.data.task is None


def test_epochs_become_steps_from_the_manifests_sample_counts():
    from biomedgpt.data.stream import ShardInfo
    from biomedgpt.spec import DatasetRef
    from biomedgpt.train.recipe import mixing_weights, steps_for_epochs

    a = [ShardInfo(f"a{i}", "a", "train", 10) for i in range(4)]  # 40 rows
    b = [ShardInfo(f"b{i}", "b", "train", 100) for i in range(2)]  # 200 rows
    refs = [DatasetRef("a"), DatasetRef("b", group="text")]
    weights = mixing_weights(refs, [a, b], {"text": 0.5})
    assert weights == [1.0, 0.5 * 40 / 200]  # the group adds half the reference rows: 20 of b's 200
    groups = list(zip([a, b], [1.0, 1.0]))
    # 240 rows, 2 ranks x batch 4: each rank's shards (plan order) give its batches; 3 epochs / accumulation 2
    from biomedgpt.data.stream import batches_per_epoch, plan_epoch

    per_epoch = [batches_per_epoch(plan_epoch(groups, e, 0), 2, 4) for e in range(3)]
    assert steps_for_epochs(groups, 3, world=2, batch_size=4, grad_accumulation=2, seed=0) == sum(per_epoch) // 2
    assert steps_for_epochs(groups, 0.5, world=1, batch_size=4, grad_accumulation=1, seed=0) == 30


# ----------------------------------------------------------------------------------------------
# Adapters: finetune.method lora (jobs/finetune/lora/, jobs/demo/pneumoniamnist_lora.yaml)
# ----------------------------------------------------------------------------------------------

LORA_DEMO = REPO / "jobs" / "demo" / "pneumoniamnist_lora.yaml"
ADAPTER_RECIPES = sorted((REPO / "jobs" / "finetune" / "lora").glob("*.yaml"))


def lora_edited(**changes):
    data = yaml.safe_load(LORA_DEMO.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return data


@pytest.mark.parametrize("changes, message", [
    (dict(model__init=KeyError), "my.yaml: finetune.method: lora adapts a trained base: give model.init (the base "
                                 "model directory, e.g. a registry version or a run's export/)"),
    (dict(finetune__target_modules=["q_prj"]), "my.yaml: finetune.target_modules[0]: 'q_prj' names no linear module "
                                               "of the model (nearest: q_proj, v_proj, k_proj)"),
    (dict(finetune__target_modules=["fc1", "encoder.layers.0.self_attn.qproj"]),
     "my.yaml: finetune.target_modules[1]: 'encoder.layers.0.self_attn.qproj' names no linear module of the model "
     "(nearest: encoder.layers.0.self_attn.q_proj,"),
    (dict(finetune__target_modules=[]), "my.yaml: finetune.target_modules: list at least one module"),
    (dict(finetune__rank=0), "my.yaml: finetune.rank: must be in [1, 256], got 0"),
    (dict(finetune__rank=257), "my.yaml: finetune.rank: must be in [1, 256], got 257"),
    (dict(finetune__rank="sixteen"), "my.yaml: finetune.rank: expected an integer, got 'sixteen'"),
    (dict(finetune__alpha=0), "my.yaml: finetune.alpha: must be > 0, got 0"),
    (dict(finetune__dropout=1.0), "my.yaml: finetune.dropout: must be in [0, 1), got 1.0"),
    (dict(finetune__method="qlora"), "my.yaml: finetune.method: expected one of 'full', 'lora', got 'qlora'"),
    (dict(finetune__methd="lora"), "my.yaml: finetune.methd: unknown field (did you mean 'method'?)"),
    (dict(finetune__trainable=["layer_norm"]), "my.yaml: finetune.trainable[0]: 'layer_norm' names a module that is "
                                               "not linear"),
    (dict(finetune__trainable=["q_proj"]), "my.yaml: finetune.trainable[0]: 'q_proj' is already adapted by "
                                           "target_modules"),
    (dict(finetune__method="full", finetune__target_modules=["q_proj"]),
     "my.yaml: finetune.target_modules: only for method: lora (method is full: every weight trains)"),
    (dict(trainer__ema={"enabled": True}), "my.yaml: trainer.ema.enabled: not with finetune.method lora"),
    (dict(evaluate__every_n_steps=10), "my.yaml: evaluate.every_n_steps: not with finetune.method lora yet"),
])
def test_bad_adapter_specs_name_file_and_field(changes, message):
    """A `method: lora` spec without model.init, with target modules the model lacks (the nearest real ones named),
    or a rank out of range is refused before anything runs, naming the file and the field."""
    with pytest.raises(SpecError) as err:
        spec_from_dict(lora_edited(**changes), "my.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_target_modules_take_names_and_dotted_suffixes():
    spec = spec_from_dict(lora_edited(finetune__target_modules=["q_proj", "decoder.layers.1.fc2"]), "x.yaml")
    assert spec.finetune.adapter()["target_modules"] == ["q_proj", "decoder.layers.1.fc2"]
    assert spec_from_dict(lora_edited(), "x.yaml").finetune.adapter()["target_modules"] == \
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def test_adapter_recipes_follow_their_full_recipes():
    """jobs/finetune/lora/<dataset>.yaml: the full recipe of the same dataset (data, model size and resolution,
    schedule, decoding, team, storage) with LoRA from a base the team may read, and admitted on the cluster."""
    from biomedgpt.tenancy import admit, load_tenants

    assert [p.stem for p in ADAPTER_RECIPES] == ["pneumoniamnist", "vqa_rad"]
    tenants = load_tenants()
    for path in ADAPTER_RECIPES:
        lora, full = load_spec(path), load_spec(REPO / "jobs" / "finetune" / path.name)
        assert lora.finetune.method == "lora" and full.finetune.method == "full"
        assert lora.model.init and lora.model.tokenizer.path == lora.model.init
        assert (lora.data, lora.team, lora.output, lora.evaluate) == (full.data, full.team, full.output, full.evaluate)
        assert (lora.model.size, lora.model.image_size) == (full.model.size, full.model.image_size)
        for key in ("epochs", "batch_size", "grad_accumulation", "warmup_ratio", "clip_grad_norm", "label_smoothing",
                    "label_smoothing_candidates", "precision", "workers"):
            assert getattr(lora.trainer, key) == getattr(full.trainer, key), (path, key)
        assert not lora.trainer.ema.enabled
        admit(lora, tenants, on_cluster=True)
