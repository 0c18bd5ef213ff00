"""The per-layer start/end table: layers ending below their start are the ones marked."""

from tsquant.fileio import save_json


def _run(tmp_path, name, ends):
    layers = [
        {
            "layer": f"l{i}",
            "kind": "coded",
            "agreement_init": 0.8,
            "agreement": end,
            "history": [{"true_error": 2.0}, {"true_error": 1.5}],
        }
        for i, end in enumerate(ends)
    ]
    layers.append({"layer": "head", "kind": "linear", "relative_error": 0.1})
    save_json(tmp_path / name / "transform" / "meta.json", {"layers": layers})
    return tmp_path / name


def test_layers_below_their_start_are_counted_per_run(tmp_path, load_benchmark):
    bench = load_benchmark("step2_layers")
    runs = [
        bench.layer_rows(_run(tmp_path, "a", [0.7, 0.9])),
        bench.layer_rows(_run(tmp_path, "b", [0.85, 0.9])),
    ]
    text = bench.table(runs, ["error", "agreement"])
    row = "| l0 | 0.8000 | 0.7000 (below) | 2.000 -> 1.500 | 0.8000 | 0.8500 | 2.000 -> 1.500 |"
    assert row in text
    assert "1 of 2 end below their start" in text and "0 of 2 end below their start" in text
    assert "head" not in text  # only coded layers have an agreement
