"""pipeline.placement: slots dealt over the nodes like cards, one per unit of capacity (worked by hand)."""
from pipeline.placement import deal, node_capacity


def test_slots_are_dealt_node_by_node_one_per_unit_of_capacity():
    assert deal({"a": 2, "b": 1}, 3) == ["a", "b", "a"]
    assert deal({"a": 2, "b": 1}, 2) == ["a", "b"]  # fewer slots than capacity: still every node
    assert deal({"a": 2, "b": 1, "gpu-less": 0}, 5) == ["a", "b", "a", "a", "b"]  # round again
    assert deal({"gpu-less": 0}, 2) == []


def test_capacity_counts_whole_units_of_the_alive_nodes():
    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}},
             {"NodeID": "b", "Alive": True, "Resources": {"CPU": 1.0}},
             {"NodeID": "c", "Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}}]
    assert node_capacity(nodes, "CPU") == {"a": 4, "b": 1}
    assert node_capacity(nodes, "GPU") == {"a": 2, "b": 0}
