"""The images index's alias: numbered index names and the actions of an atomic swap
(orchard.core.index_alias)."""

from __future__ import annotations

from orchard.core.index_alias import next_index, number_of, numbered, swap_actions


def test_numbered_indices_are_recognised_and_the_next_one_follows_the_highest() -> None:
    assert numbered("orchard-images", 3) == "orchard-images-3"
    assert number_of("orchard-images", "orchard-images-12") == 12
    assert number_of("orchard-images", "orchard-images") is None
    assert number_of("orchard-images", "orchard-images-old") is None
    assert number_of("orchard-images", "orchard-images-2-copy") is None
    assert number_of("a.b", "axb-1") is None  # the alias is matched literally
    assert next_index("orchard-images", []) == "orchard-images-1"
    assert next_index("orchard-images", ["orchard-images-2", "orchard-images-10", "other-99"]) == "orchard-images-11"


def test_a_swap_moves_the_alias_in_one_call_and_replaces_a_legacy_index() -> None:
    actions = swap_actions("ix", "ix-3", ["ix-2"], legacy=False)
    assert actions == [
        {"remove": {"index": "ix-2", "alias": "ix"}},
        {"add": {"index": "ix-3", "alias": "ix", "is_write_index": True}},
    ]
    legacy = swap_actions("ix", "ix-1", [], legacy=True)
    assert legacy[0] == {"remove_index": {"index": "ix"}} and legacy[-1]["add"]["index"] == "ix-1"
