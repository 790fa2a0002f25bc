"""errors.py: skipped items are reported one way by every script: the first few named, all counted."""
import errors


def test_the_first_few_skipped_items_are_named_and_the_rest_counted():
    said = []
    errors.report_skipped(said.append, "unreadable image", [f"img{i}.png" for i in range(8)], total=8)
    assert said == [f"skipped unreadable image: img{i}.png" for i in range(errors.SHOWN_SKIPPED)] + \
        ["... 8 unreadable images skipped in all"]


def test_items_named_earlier_in_a_run_count_towards_the_few_named():
    said = []
    errors.report_skipped(said.append, "unreadable image", ["a", "b", "c"], named_before=3)
    assert said == ["skipped unreadable image: a", "skipped unreadable image: b"]
    said.clear()
    errors.report_skipped(said.append, "unreadable image", ["d"], named_before=5)
    assert said == []


def test_no_total_line_when_every_item_was_named():
    said = []
    errors.report_skipped(said.append, "missing image", ["x", "y"], total=2)
    assert said == ["skipped missing image: x", "skipped missing image: y"]


def test_a_summary_counts_all_and_keeps_the_first_few():
    summary = errors.skipped_summary([str(i) for i in range(9)])
    assert summary == {"count": 9, "first": ["0", "1", "2", "3", "4"]}
