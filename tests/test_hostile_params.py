"""Hostile merge parameters: every value is checked against its method's type and range when the recipe loads,
before any work, wherever it appears (merge.parameters, a slice's, a slice source's, a model's), as a scalar, each
element of a gradient list and each value of a filter list; the refusal names the file, the full key down to the
element and the fix. Edge values that are legal (density 0 and 1, t 0 and 1, negative weights, gradients, filter
lists) still load."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Workspace, assert_refused
from steps import methods
from steps.recipe import load


def recipe(model: Path, merge: str) -> str:
    """Two sources (the same tiny model twice) and a merge block given as its indented YAML lines."""
    return f"sources:\n  a: {{path: {model}}}\n  b: {{path: {model}}}\nmerge:\n{merge}"


def models(method: str, a: str = "", b: str = "{weight: 1}", top: str = "", extra: str = "") -> str:
    """A models: merge of a (the base) and b, with the given parameters at each level."""
    base = "  base_model: a\n" if method not in ("linear", "karcher") else ""
    params = f"  parameters: {top}\n" if top else ""
    a_params = f"\n      parameters: {a}" if a else ""
    return (f"  merge_method: {method}\n{base}{extra}{params}  models:\n    - model: a{a_params}\n"
            f"    - model: b\n      parameters: {b}\n")


def slices(method: str, a: str = "", b: str = "{weight: 1}", sl: str = "", top: str = "") -> str:
    """A one-slice merge of a (the base) and b over layers [0, 4), with parameters at each level."""
    base = "  base_model: a\n" if method not in ("linear", "karcher", "passthrough") else ""
    params = f"  parameters: {top}\n" if top else ""
    sl_params = f"\n      parameters: {sl}" if sl else ""
    a_params = f", parameters: {a}" if a else ""
    b_entry = f"\n        - {{model: b, layer_range: [0, 4], parameters: {b}}}" if b is not None else ""
    return (f"  merge_method: {method}\n{base}{params}  slices:\n    - sources:\n"
            f"        - {{model: a, layer_range: [0, 4]{a_params}}}{b_entry}{sl_params}\n")


# (merge block, the full key refused, a word of the fix)
HOSTILE = {
    # ranges, in each of the four places
    "density_above_1_model": (models("ties", b="{weight: 1, density: 1.5}"),
                              "merge.models[1].parameters.density", "is outside [0, 1]"),
    "density_negative_top": (models("ties", top="{density: -0.1}"),
                             "merge.parameters.density", "use a number from 0 to 1"),
    "t_above_1_top": (models("slerp", b="{}", top="{t: 1.5}"), "merge.parameters.t", "use a number from 0 to 1"),
    "t_negative_slice": (slices("slerp", b="{}", sl="{t: -0.5}"), "merge.slices[0].parameters.t",
                         "use a number from 0 to 1"),
    "density_slice_source": (slices("dare_ties", b="{weight: 1, density: 2}"),
                             "merge.slices[0].sources[1].parameters.density", "use a number from 0 to 1"),
    "gamma_above_1": (models("breadcrumbs", b="{weight: 1, gamma: 1.5}"), "merge.models[1].parameters.gamma",
                      "use a number from 0 to 1"),
    "epsilon_half": (models("della", b="{weight: 1, density: 0.5, epsilon: 0.5}"),
                     "merge.models[1].parameters.epsilon", "[0, 0.5)"),
    "della_density_plus_epsilon": (models("della", b="{weight: 1, density: 0.9}"),
                                   "merge.models[1].parameters.epsilon", "use an epsilon below 0.1"),
    "della_gradient_knot": (models("della", top="{epsilon: 0.1}", b="{weight: 1, density: [0.5, 0.95]}"),
                            "merge.parameters.epsilon", "use an epsilon below 0.05"),
    "select_topk_above_1": (models("sce", b="{}", top="{select_topk: 2}"), "merge.parameters.select_topk",
                            "use a number from 0 to 1"),
    "karcher_max_iter_zero": (models("karcher", b="{}", top="{max_iter: 0}"), "merge.parameters.max_iter",
                              "whole number of at least 1"),
    "karcher_max_iter_fraction": (models("karcher", b="{}", top="{max_iter: 2.5}"), "merge.parameters.max_iter",
                                  "is not a whole number"),
    "karcher_tol_zero": (models("karcher", b="{}", top="{tol: 0}"), "merge.parameters.tol", "above 0"),
    # types: strings, NaN, infinities, nulls, bools where numbers go, numbers where bools go
    "weight_word": (models("linear", a="{weight: heavy}"), "merge.models[0].parameters.weight", "use a number"),
    "weight_quoted_number": (models("ties", b="{weight: '0.5'}"), "merge.models[1].parameters.weight",
                             "is not a number"),
    "weight_nan": (models("task_arithmetic", b="{weight: .nan}"), "merge.models[1].parameters.weight",
                   "is not a finite number"),
    "weight_inf_slice_source": (slices("linear", a="{weight: 1}", b="{weight: -.inf}"),
                                "merge.slices[0].sources[1].parameters.weight", "is not a finite number"),
    "weight_bool": (models("ties", b="{weight: true}"), "merge.models[1].parameters.weight", "is not a number"),
    "weight_null": (models("ties", b="{weight: null}"), "merge.models[1].parameters.weight", "is not a number"),
    "lambda_nan": (models("ties", top="{lambda: .nan}"), "merge.parameters.lambda", "is not a finite number"),
    "normalize_number": (models("linear", a="{weight: 1}", top="{normalize: 1}"), "merge.parameters.normalize",
                         "use true or false"),
    "rescale_string_slice": (slices("dare_linear", sl="{rescale: 'yes'}"), "merge.slices[0].parameters.rescale",
                             "use true or false"),
    "int8_mask_number_model": (models("ties", b="{weight: 1, int8_mask: 0}"),
                               "merge.models[1].parameters.int8_mask", "use true or false"),
    "nuslerp_flatten_string": (models("nuslerp", a="{weight: 1}", top="{nuslerp_flatten: 'no'}"),
                               "merge.parameters.nuslerp_flatten", "use true or false"),
    "filter_wise_number": (models("model_stock", b="{}", top="{filter_wise: 0}"), "merge.parameters.filter_wise",
                           "use true or false"),
    "scale_word": (slices("passthrough", a="{scale: big}", b=None), "merge.slices[0].sources[0].parameters.scale",
                   "use a number"),
    # gradient lists
    "gradient_element_out_of_range": (models("ties", b="{weight: 1, density: [0.2, 1.2]}"),
                                      "merge.models[1].parameters.density[1]", "use a number from 0 to 1"),
    "gradient_element_string": (models("ties", top="{density: [0.2, high, 0.5]}"),
                                "merge.parameters.density[1]", "is not a number"),
    "gradient_nested_list": (slices("ties", sl="{density: [[0.1, 0.2]]}"), "merge.slices[0].parameters.density[0]",
                             "a gradient lists plain values"),
    "gradient_empty": (models("linear", a="{weight: []}"), "merge.models[0].parameters.weight",
                       "a gradient list of values"),
    "gradient_bool_element": (models("slerp", b="{}", top="{t: [0, true, 1]}"), "merge.parameters.t[1]",
                              "is not a number"),
    # filter lists
    "filter_value_out_of_range": (models("ties", top="{density: [{filter: mlp, value: 0.5}, {value: 1.5}]}"),
                                  "merge.parameters.density[1].value", "use a number from 0 to 1"),
    "filter_value_string": (models("linear", a="{weight: 1}", top="{weight: [{filter: mlp, value: heavy}]}"),
                            "merge.parameters.weight[0].value", "use a number"),
    "filter_not_a_string": (models("ties", b="{weight: [{filter: 3, value: 1}]}"),
                            "merge.models[1].parameters.weight[0].filter", "give a substring of the tensor names"),
    "filter_entry_unknown_key": (models("ties", b="{weight: [{filter: mlp, valeu: 1}]}"),
                                 "merge.models[1].parameters.weight[0].valeu", "did you mean 'value'?"),
    "filter_entry_without_value": (slices("ties", sl="{density: [{filter: mlp}]}"),
                                   "merge.slices[0].parameters.density[0].value", "missing"),
    "filter_single_mapping": (models("ties", b="{weight: 1, density: {filter: mlp, value: 1.5}}"),
                              "merge.models[1].parameters.density.value", "use a number from 0 to 1"),
    "filter_value_gradient_element": (
        models("slerp", b="{}", top="{t: [{filter: self_attn, value: [0, 2]}, {value: 0.5}]}"),
        "merge.parameters.t[0].value[1]", "use a number from 0 to 1"),
    "filter_value_empty_list": (models("ties", b="{weight: 1, density: [{filter: mlp, value: []}]}"),
                                "merge.models[1].parameters.density[0].value", "a gradient list of values"),
    "filter_mixed_with_number": (slices("ties", b="{weight: [{filter: mlp, value: 1}, 0.5]}"),
                                 "merge.slices[0].sources[1].parameters.weight[1]", "give every element as"),
    "filter_bool_value": (models("ties", top="{normalize: [{filter: mlp, value: 1}, {value: false}]}"),
                          "merge.parameters.normalize[0].value", "use true or false"),
    # the parameters mapping itself, and the merge block's other numbers
    "parameters_not_a_mapping": (models("ties", top="[0.5]"), "merge.parameters", "expected a mapping"),
    "parameter_of_another_method": (models("ties", top="{t: 0.5}"), "merge.parameters.t", "unknown key"),
    "random_seed_negative": (models("dare_ties", extra="  random_seed: -1\n"), "merge.random_seed",
                             "non-negative integer"),
    "random_seed_fraction": (models("dare_ties", extra="  random_seed: 1.5\n"), "merge.random_seed",
                             "non-negative integer"),
    "random_seed_bool": (models("dare_ties", extra="  random_seed: true\n"), "merge.random_seed",
                         "non-negative integer"),
    "shard_bytes_zero": (models("ties", extra="  shard_bytes: 0\n"), "merge.shard_bytes", "positive integer"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_parameter_is_refused(case: str, workspace: Workspace, tiny_llama: Path) -> None:
    merge, key, fix = HOSTILE[case]
    path = workspace.write_recipe(case, recipe(tiny_llama, merge))
    assert_refused(workspace, str(path), f" {key}: ", fix)


def test_message_names_range_meaning_and_fix(workspace: Workspace, tiny_llama: Path) -> None:
    path = workspace.write_recipe("dense", recipe(tiny_llama, models("ties", b="{weight: 1, density: 1.5}")))
    line = assert_refused(workspace, str(path))
    assert line == (f"mergeforge: {path}: merge.models[1].parameters.density: density 1.5 is outside [0, 1]: the "
                    "fraction of each task vector kept; use a number from 0 to 1")


GOOD = {
    "density_0_and_1": models("ties", b="{weight: 1, density: 0}", top="{density: 1}"),
    "density_gradient_edges": models("dare_ties", b="{weight: 1, density: [0, 0.5, 1]}", extra="  random_seed: 0\n"),
    "t_0": models("slerp", b="{}", top="{t: 0}"),
    "t_1": slices("slerp", b="{}", sl="{t: 1}"),
    "t_gradient_and_filters": models("slerp", b="{}", top="{t: [{filter: self_attn, value: [0, 0.5, 1]}, "
                                                          "{value: 0.3}]}"),
    "negative_weight": models("task_arithmetic", b="{weight: -0.5}", top="{lambda: -1}"),
    "weight_gradient_and_filters": models("linear", a="{weight: [-1, 0, 2.5]}",
                                          b="{weight: [{filter: mlp, value: 0.7}, {filter: '*', value: [0, 1]}, "
                                            "{value: 0.3}]}"),
    "weight_single_filter_mapping": slices("ties", b="{weight: {filter: mlp, value: 2}}"),
    "integer_values_for_numbers": models("breadcrumbs", b="{weight: 2, density: 1, gamma: 0}"),
    "bool_gradient": models("ties", top="{normalize: [true, false], rescale: [{filter: mlp, value: true}]}"),
    "della_edges": models("della", b="{weight: 1, density: 0.5, epsilon: 0.49}"),
    "della_density_1_any_epsilon": models("della_linear", b="{weight: 1, density: 1, epsilon: 0.4}"),
    "della_filtered_density": models("della", b="{weight: 1, density: [{filter: mlp, value: 0.9}, {value: 0.5}]}"),
    "karcher_small": models("karcher", b="{}", top="{max_iter: 1, tol: 1.0e-12}"),
    "sce_topk_0": models("sce", b="{}", top="{select_topk: 0, int8_mask: true}"),
    "nuslerp_flags": models("nuslerp", a="{weight: 0.5}", b="{weight: 0}",
                            top="{nuslerp_flatten: false, nuslerp_row_wise: true}"),
    "scale_negative": slices("passthrough", a="{scale: -1}", b=None),
    "base_weight_ignored": models("ties", a="{weight: 0}", b="{weight: 1}"),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_legal_edge_values_load(case: str, tmp_path: Path, tiny_llama: Path) -> None:
    path = tmp_path / f"{case}.yaml"
    path.write_text(recipe(tiny_llama, GOOD[case]))
    r = load(path)
    assert r.merge["merge_method"] in methods.names()


def test_every_parameter_declares_type_and_range() -> None:
    for name in methods.names():
        declared = methods.params(name)
        if name in methods.LAYERED:
            assert set(declared) == {"scale"}
            continue
        method = methods.get(name)
        assert set(declared) == set(method.defaults()), name
        for p, spec in declared.items():
            assert isinstance(spec, methods.Param) and spec.kind in ("number", "int", "bool"), (name, p)
            assert spec.default is methods.REQUIRED or spec.problem(spec.default) is None, (name, p, spec.default)
            assert spec.what, (name, p)


def test_registering_an_undeclared_parameter_is_refused() -> None:
    with pytest.raises(TypeError, match="not declared as a Param"):
        methods.merge_method("bogus", shared={"t": 0.5})
