"""capfilt.config: the shipped YAML files, dotted overrides, validation (the fingerprint: test_identity.py)."""

from pathlib import Path

import pytest

from capfilt.config import CaptionerConfig, Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LARGE = CONFIGS / "blip_large.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(str(path))
    assert isinstance(config, Config)
    assert config.captioner.min_length <= config.captioner.max_length


@pytest.mark.parametrize("name, captioner, itm", [
    ("blip_large.yaml", "Salesforce/blip-image-captioning-large", "Salesforce/blip-itm-large-coco"),
    ("blip_base.yaml", "Salesforce/blip-image-captioning-base", "Salesforce/blip-itm-base-coco"),
])
def test_blip_configs_keep_capfilt_defaults(name, captioner, itm):
    config = load_config(str(CONFIGS / name))
    cap = config.captioner
    assert cap.model == captioner
    assert config.filter.model == itm
    assert cap.prompt == "a picture of "  # the trailing space matters to BLIP's tokenizer
    assert (cap.top_p, cap.max_length, cap.min_length) == (0.9, 20, 5)
    assert cap.repetition_penalty == 1.1
    assert cap.num_captions == 5
    assert config.filter.threshold == 0.5


def test_defaults_without_a_file_are_blip_large():
    config = load_config()
    assert config.captioner.model == "Salesforce/blip-image-captioning-large"
    assert config.filter.model == "Salesforce/blip-itm-large-coco"
    large = load_config(str(LARGE))
    for section in ("captioner", "filter", "reader"):
        assert getattr(config, section) == getattr(large, section), section


def test_overrides_are_applied_with_yaml_typing():
    config = load_config(str(LARGE), [
        "filter.threshold=0.6",
        "runtime.num_workers=3",
        "runtime.ray_address=null",
        "runtime.gpus_per_worker=1",
        'captioner.prompt="a photo of "',
        "reader.image_extensions=[jpg, png]",
    ])
    assert config.filter.threshold == 0.6 and type(config.filter.threshold) is float
    assert config.runtime.num_workers == 3 and type(config.runtime.num_workers) is int
    assert config.runtime.ray_address is None
    # An int where a float is expected is widened, so arithmetic downstream stays float.
    assert config.runtime.gpus_per_worker == 1.0 and type(config.runtime.gpus_per_worker) is float
    assert config.captioner.prompt == "a photo of "
    assert config.reader.image_extensions == ["jpg", "png"]
    # Untouched keys keep the file's values.
    assert config.runtime.batch_size == "auto" and config.runtime.decode_threads == 4


def test_override_sets_a_string_address():
    config = load_config(str(LARGE), ["runtime.ray_address=127.0.0.1:6379"])
    assert config.runtime.ray_address == "127.0.0.1:6379"


def test_input_and_output_keywords_win_over_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: from_file/{0..1}.tar\noutput: out_file\n")
    config = load_config(str(path), ["output=out_override"], input="kw/*.tar", output="out_kw")
    assert config.input == "kw/*.tar"
    assert config.output == "out_kw"
    # None keywords (flags not given on the command line) leave the file's values alone.
    config = load_config(str(path), input=None, output=None)
    assert config.input == "from_file/{0..1}.tar"
    assert config.output == "out_file"


def test_input_may_be_a_list(tmp_path):
    config = load_config(None, input=["a/0.tar", "b/*.tar"])
    assert config.input == ["a/0.tar", "b/*.tar"]


@pytest.mark.parametrize("overrides, key", [
    (["bogus=1"], "bogus"),
    (["filter.thresh=0.6"], "filter.thresh"),
    (["runtime.num_gpus=1"], "runtime.num_gpus"),
    (["filter.threshold=high"], "filter.threshold"),
    (["runtime.num_workers=2.5"], "runtime.num_workers"),
    (["runtime.num_workers=true"], "runtime.num_workers"),
    (["runtime.ray_address=3"], "runtime.ray_address"),
    (["captioner=3"], "captioner"),
    (["reader.image_extensions=jpg"], "reader.image_extensions"),
    (["filter.threshold=1.5"], "filter.threshold"),
    (["filter.threshold=-0.1"], "filter.threshold"),
    (["captioner.top_p=1.01"], "captioner.top_p"),
    (["runtime.num_workers=0"], "runtime.num_workers"),
    (["runtime.batch_size=0"], "runtime.batch_size"),
    (["runtime.dtype=fp8"], "runtime.dtype"),
    (["runtime.device=tpu"], "runtime.device"),
    (["filter.selection=longest"], "filter.selection"),
    (["captioner.min_length=30"], "captioner.min_length"),
    (["filter.threshold"], "filter.threshold"),
    (["=0.6"], "=0.6"),
])
def test_bad_values_raise_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(str(LARGE), overrides)
    assert key in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("filter:\n  threshold: 0.5\n  thresh: 0.7\n", r"filter\.thresh\b"),  # unknown key in a section
    ("captoner:\n  num_captions: 3\n", "captoner"),  # unknown top-level key
    ("captioner:\n  max_length: 10\n  min_length: 12\n", "min_length"),
    ("- a\n- b\n", "mapping"),  # not a mapping at all
], ids=["unknown_nested", "unknown_top_level", "min_over_max", "not_a_mapping"])
def test_bad_config_file_is_an_error_naming_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


@pytest.mark.parametrize("override", ["captioner.prompt=[a photo", "captioner.prompt=a: b: c"])
def test_override_with_invalid_yaml_value_raises_config_error_naming_the_key(override):
    with pytest.raises(ConfigError, match=r"captioner\.prompt"):
        load_config(str(LARGE), [override])


def test_each_temperature_has_its_own_bound():
    # ITC's initial temperature is clamped to [0.001, 0.5] in training; sampling's is any positive.
    with pytest.raises(ConfigError, match=r"^finetune\.filter\.temperature: 0\.9\b"):
        load_config(str(LARGE), ["finetune.filter.temperature=0.9"])
    assert load_config(str(LARGE), ["captioner.temperature=0.9"]).captioner.temperature == 0.9
    assert load_config(str(LARGE), ["finetune.filter.temperature=0.5"]).finetune.filter.temperature == 0.5
    with pytest.raises(ConfigError, match=r"^captioner\.temperature: 0\b"):
        load_config(str(LARGE), ["captioner.temperature=0"])


def test_bound_error_names_the_full_dotted_key_and_the_value():
    with pytest.raises(ConfigError, match=r"^finetune\.captioner\.scratch\.hidden: 4: .*greater than or equal to 8"):
        load_config(str(LARGE), ["finetune.captioner.scratch.hidden=4"])


def test_unknown_nested_key_is_refused_with_the_known_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'finetune\.filter\.treshold' \(known here: .*temperature"):
        load_config(str(LARGE), ["finetune.filter.treshold=0.6"])


def test_sections_built_in_code_are_validated_too():
    with pytest.raises(ValueError, match="top_p"):
        CaptionerConfig(top_p=1.5)
    with pytest.raises(ValueError, match="bogus"):
        CaptionerConfig(bogus=1)


def test_a_nested_override_keeps_the_defaults_its_parent_gives():
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float field takes it.
    config = load_config(None, ["finetune.filter.lr=1e-4"])  # no file: the epochs are the defaults'
    assert config.finetune.filter.lr == 1e-4 and type(config.finetune.filter.lr) is float
    assert (config.finetune.filter.epochs, config.finetune.filter.max_text_tokens) == (6, 35)
