import pytest

from pipeline.errors import CrosscodersError
from pipeline.layers import layer_ranges, parse_layers, stored_layers


def test_parse_layers():
    assert parse_layers("all", 5) == [0, 1, 2, 3, 4]
    assert parse_layers("0-2,4", 5) == [0, 1, 2, 4]
    assert parse_layers("4, 1-2,2", 5) == [1, 2, 4]
    with pytest.raises(CrosscodersError, match="'a-b' is not a layer list"):
        parse_layers("a-b", 5)
    with pytest.raises(CrosscodersError, match="'1-' is not a layer list"):
        parse_layers("0,1-", 5)
    with pytest.raises(CrosscodersError, match=r"range '5-3' is empty; write the lower layer first \(3-5\)"):
        parse_layers("5-3", 5)
    with pytest.raises(CrosscodersError, match="'' is not a layer list"):
        parse_layers("", 5)
    with pytest.raises(CrosscodersError, match=r"layer 5 is out of range; the model has 5 hidden states \(0..4\)"):
        parse_layers("3-5", 5)
    with pytest.raises(CrosscodersError, match="layer 5 is out of range"):  # a typo, refused before it is listed
        parse_layers("0-10000000000", 5)


def test_stored_layers_are_the_stores_or_a_list_it_holds():
    assert stored_layers("all", [1, 3], 5) == [1, 3]
    assert stored_layers("3,1", [1, 3], 5) == [1, 3]
    with pytest.raises(CrosscodersError, match=r"--layers '1-2': the store was not cached at hidden state 2; pick from \[1, 3\]"):
        stored_layers("1-2", [1, 3], 5)
    with pytest.raises(CrosscodersError, match="layer 7 is out of range"):
        stored_layers("7", [1, 3], 5)


def test_layer_ranges_write_a_layer_list_in_the_layers_syntax():
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and layer_ranges([3]) == "3" and layer_ranges([]) == ""
    for layers in ([0, 2, 4], list(range(25)), [1, 2, 3, 10, 11, 24], [24]):
        assert parse_layers(layer_ranges(layers), 25) == layers
