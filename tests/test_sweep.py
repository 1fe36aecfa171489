"""The chapters' matching recipe, the stored seed sweep, and the spread table that sets assert bounds."""


import nbformat
import pytest

from mmlite.book import spread_table
from mmlite.sweep import DEFAULT_PLAN, DEFAULT_SEEDS, VARIANTS, build_matching, load_sweep, matching_fit_config, run_sweep
from mmlite.utils import count_parameters


def head_size(model) -> int:
    return count_parameters(model.fusion) + count_parameters(model.classifier)


def test_concat_mlp_is_capacity_matched_to_cross_attention():
    cross, concat, wide = (build_matching(v, 59, seed=0) for v in ("cross_attention", "concat", "concat_mlp"))
    assert head_size(concat) < 0.25 * head_size(cross)  # the plain baseline is far smaller
    assert abs(head_size(wide) - head_size(cross)) < 0.01 * head_size(cross)
    assert abs(count_parameters(wide) - count_parameters(cross)) < 0.01 * count_parameters(cross)


def test_same_seed_same_encoders_for_every_variant():
    a, b = build_matching("cross_attention", 59, seed=3), build_matching("concat", 59, seed=3)
    for (name, p), q in zip(a.image_encoder.state_dict().items(), b.image_encoder.state_dict().values()):
        assert p.equal(q), name


def test_recipe_and_plan_validation():
    assert matching_fit_config(300).warmup == 30 and matching_fit_config(1000).warmup == 50
    with pytest.raises(ValueError, match="variant must be one of"):
        build_matching("bogus", 59, seed=0)
    with pytest.raises(ValueError, match="bad plan entry"):
        run_sweep((("concat", 0),), (0,))
    with pytest.raises(ValueError, match="no sweep at"):
        load_sweep("/nonexistent/sweep.json")


def test_stored_sweep_holds_every_run_the_chapters_read():
    sweep = load_sweep()
    have = {(r["variant"], r["steps"], r["seed"]) for r in sweep["runs"]}
    assert have == {(v, s, seed) for v, s in DEFAULT_PLAN for seed in DEFAULT_SEEDS}
    assert set(sweep["recipe"]["variants"]) == set(VARIANTS)
    for r in sweep["runs"]:
        for split in ("test", "comp"):
            assert 0.5 < r[split]["accuracy"] <= 1.0 and "binding/swap_attribute" in r[split], r


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    for source, text in cells:
        cell = nbformat.v4.new_code_cell(source)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_spread_table_reads_only_ignored_cells_and_aligns_numbers(tmp_path):
    runs = [_notebook(tmp_path / f"r{k}.ipynb", [("# NBVAL_IGNORE_OUTPUT\nprint(acc)", f"acc {a:.3f} loss {b:.2f}\n"),
                                                 ("print(n)", "n 0.500\n")])
            for k, (a, b) in enumerate([(0.80, 1.00), (0.90, 2.00), (0.85, 3.00)])]
    lines = spread_table(runs)
    text = "\n".join(lines)
    assert "cell 1" not in text  # a compared cell is not a trained number
    acc_line = next(line for line in lines if line.strip().startswith("acc"))
    assert "mean 0.85" in acc_line and "min 0.8" in acc_line and "max 0.9" in acc_line
    loss_line = next(line for line in lines if "loss" in line)
    assert "mean 2 " in loss_line and "sd 1" in loss_line


def test_spread_table_flags_runs_that_print_different_counts(tmp_path):
    a = _notebook(tmp_path / "a.ipynb", [("# NBVAL_IGNORE_OUTPUT", "x 0.1 y 0.2\n")])
    b = _notebook(tmp_path / "b.ipynb", [("# NBVAL_IGNORE_OUTPUT", "x 0.1\n")])
    assert "different numbers of values" in "\n".join(spread_table([a, b]))
