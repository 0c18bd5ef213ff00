import pytest

from tsquant.pipeline.config import ConfigError, RunConfig, load_config, option_table


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(
        write(tmp_path, "name: x\ncodes:\n  eps: 0.5\ntransform:\n  tsq:\n    lam: 2\n")
    )
    assert cfg.name == "x" and cfg.codes.eps == 0.5 and cfg.transform.tsq.lam == 2.0
    assert isinstance(cfg.transform.tsq.lam, float)
    # untouched nested defaults survive a partial section
    assert cfg.codes.bits == 2 and cfg.codes.epochs == RunConfig().codes.epochs


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, {"train.epochs": "3", "data.download": "true", "data.root": "none"})
    assert cfg.train.epochs == 3 and cfg.data.download is True and cfg.data.root is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("trian:\n  epochs: 1\n", "did you mean 'train'"),
        ("codes:\n  epss: 0.3\n", "did you mean 'codes.eps'"),
        ("codes:\n  eps: -0.1\n", "codes.eps=-0.1 is out of range"),
        ("codes:\n  bits: 9\n", "codes.bits=9 is out of range"),
        ("transform:\n  tsq:\n    lam: 0\n", "transform.tsq: lam must be a finite number > 0"),
        ("transform:\n  weight_bits: 'ternery'\n", "unknown weight format"),
        ("train:\n  epochs: many\n", "train.epochs must be int"),
        ("transform:\n  mode: sideways\n", "transform.mode='sideways' is not a choice: use"),
        ("- a\n- b\n", "not sections of options"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_validation_errors_name_the_key_and_fix(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_option_table_has_help_for_every_option():
    rows = option_table()
    names = [r[0] for r in rows]
    assert "codes.eps" in names and "transform.weight_bits" in names and "seed" in names
    assert all(help_text for _, _, help_text in rows)
    # nested defaults of the instance (codes trains with a small lr) are shown
    assert dict((n, d) for n, d, _ in rows)["codes.lr"] == RunConfig().codes.lr


def test_yaml_transform_settings_reach_the_solver_unchanged(tmp_path):
    from dataclasses import fields

    from tsquant.baselines.adaround import AdaRoundConfig
    from tsquant.pipeline.config import TransformStageConfig
    from tsquant.pipeline.stages import Context
    from tsquant.transform import OTWAConfig, TransformConfig

    (tmp_path / "c.yaml").write_text(
        "transform:\n  weight_bits: 2\n  positions_per_image: 9\n"
        "  tsq:\n    lam: 5.0\n    iters: 3\n    variant: paper\n    margin: 0.2\n"
    )
    tcfg = Context(load_config(tmp_path / "c.yaml")).transform_config()
    solver = tcfg.method
    assert (solver.lam, solver.iters, solver.variant, solver.margin) == (5.0, 3, "paper", 0.2)
    assert tcfg.weight_bits == 2 and tcfg.positions_per_image == 9
    for method, options in (("adaround", AdaRoundConfig(iters=7)), ("otwa", OTWAConfig())):
        extra = {"transform.adaround.iters": "7"} if method == "adaround" else {}
        cfg = load_config(None, {"transform.method": method, **extra})
        assert Context(cfg).transform_config().method == options
    # the section is the library's TransformConfig, with one options section per method
    section = {f.name for f in fields(TransformStageConfig)}
    library = {f.name for f in fields(TransformConfig)}
    assert section - library == {"tsq", "adaround"}
    assert library - section == {"seed", "device", "verbose", "input_key"}  # run-level or API


def test_options_of_a_method_that_does_not_run_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="transform.tsq.lam is set but transform.method is otwa"):
        load_config(None, {"transform.method": "otwa", "transform.tsq.lam": "5"})
    with pytest.raises(ConfigError, match="set it there"):
        load_config(None, {"transform.tsq.weight_bits": "2"})
    with pytest.raises(ConfigError, match="did you mean 'transform.tsq.lam'"):
        load_config(None, {"transform.lam": "5"})
    with pytest.raises(ConfigError, match="did you mean 'memory.cache_mb'"):
        load_config(None, {"transform.cache_mb": "5"})


def test_provenance_sees_the_order_of_layer_formats(tmp_path):
    from tsquant.pipeline.provenance import stage_config

    def record(formats):
        (tmp_path / "c.yaml").write_text(f"transform:\n  layer_formats: {formats}\n")
        return stage_config(load_config(tmp_path / "c.yaml"), "transform")

    first = record('{"layer1.*": 2, "layer1.0.*": 4}')
    assert first != record('{"layer1.0.*": 4, "layer1.*": 2}')  # the first match wins
    assert first == record('{"layer1.*": 2, "layer1.0.*": 4}')
    # options of a method that does not run (and memory options) do not re-run the stage
    assert not [k for k in first if k.startswith("transform.adaround.") or "cache_mb" in k]
    assert first["transform.tsq.lam"] == 3.0
