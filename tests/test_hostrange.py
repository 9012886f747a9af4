"""Host range expansion (ClusterShell NodeSet style) and address templates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rexplan.core.hostrange import MAX_HOSTS, RangeHost, check_template, expand, is_range, render


def names(pattern: str) -> list[str]:
    return [h.name for h in expand(pattern)]


def test_plain_name_expands_to_itself() -> None:
    assert expand("web1.example.com") == [RangeHost("web1.example.com", ())]
    assert not is_range("web1") and is_range("node[1-2]")


def test_zero_padding_is_kept() -> None:
    got = names("node[001-147]")
    assert len(got) == 147
    assert got[:3] == ["node001", "node002", "node003"] and got[-1] == "node147"


def test_unpadded_range_and_values() -> None:
    assert expand("n[8-10]") == [
        RangeHost("n8", (8,)),
        RangeHost("n9", (9,)),
        RangeHost("n10", (10,)),
    ]


def test_lists_keep_the_order_written() -> None:
    assert names("n[1-3,7,10-12]") == ["n1", "n2", "n3", "n7", "n10", "n11", "n12"]
    assert names("n[5,1]") == ["n5", "n1"]


def test_cartesian_product_first_range_outermost() -> None:
    got = expand("rack[1-4]-n[01-32]")
    assert len(got) == 128
    assert [h.name for h in got[:3]] == ["rack1-n01", "rack1-n02", "rack1-n03"]
    assert got[31] == RangeHost("rack1-n32", (1, 32))
    assert got[32] == RangeHost("rack2-n01", (2, 1))
    assert got[-1] == RangeHost("rack4-n32", (4, 32))
    assert [h.name for h in got] == [f"rack{r}-n{n:02d}" for r in range(1, 5) for n in range(1, 33)]


def test_suffix_after_range() -> None:
    assert names("web[1-2].example.com") == ["web1.example.com", "web2.example.com"]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("node[10-1]", "range 10-1 is reversed"),
        ("node[1-3", "unbalanced"),
        ("node1-3]", "unbalanced"),
        ("node[[1-3]]", "unbalanced"),
        ("node[]", "bad range item ''"),
        ("node[a-c]", "bad range item 'a-c'"),
        ("node[1-]", "bad range item '1-'"),
        ("node[1,,2]", "bad range item ''"),
        ("node[01-100]", "mixes zero-padded widths"),
        ("node[1-3,2]", "2 is listed twice"),
        ("node[0-100000]", f"more than {MAX_HOSTS} hosts"),
        ("a[1-1000]b[1-1000]", f"expands to 1000000 hosts, more than {MAX_HOSTS}"),
        ("node[1-99999999999999999999]", f"more than {MAX_HOSTS} hosts"),
    ],
)
def test_bad_ranges(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        expand(pattern)
    assert message in str(info.value)
    assert repr(pattern) in str(info.value)


def test_address_templates() -> None:
    host = RangeHost("rack2-n07", (2, 7))
    assert render("10.1.0.{n}", host) == "10.1.0.7"
    assert render("10.{n1}.{n2}.1", host) == "10.2.7.1"
    assert render("{name}.example.com", host) == "rack2-n07.example.com"
    assert render("127.0.0.1", host) == "127.0.0.1"
    assert [render("127.0.0.{n}", h) for h in expand("node[008-010]")] == [
        "127.0.0.8",
        "127.0.0.9",
        "127.0.0.10",
    ]


@pytest.mark.parametrize(
    ("template", "ranges", "message"),
    [
        ("10.0.0.{x}", 1, "unknown placeholder {x}"),
        ("10.0.0.{n0}", 1, "unknown placeholder {n0}"),
        ("10.0.0.{n", 1, "unbalanced"),
        ("10.0.0.n}", 1, "unbalanced"),
        ("10.0.0.{n}", 0, "has no range"),
        ("10.0.{n3}.1", 2, "has only 2 range(s)"),
        ("10.0.0.{n:03}", 1, "unknown placeholder"),
    ],
)
def test_bad_templates(template: str, ranges: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_template(template, ranges)
    assert message in str(info.value)


def test_name_placeholder_needs_no_range() -> None:
    check_template("{name}.lan", 0)
    assert render("{name}.lan", RangeHost("web1", ())) == "web1.lan"


@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 5)).map(lambda t: (t[0], t[0] + t[1])),
        min_size=1,
        max_size=4,
    )
)
def test_expansion_matches_a_plain_model(spans: list[tuple[int, int]]) -> None:
    values = [v for lo, hi in spans for v in range(lo, hi + 1)]
    spec = ",".join(f"{lo}-{hi}" for lo, hi in spans)
    if len(set(values)) != len(values):
        with pytest.raises(ValueError, match="listed twice"):
            expand(f"h[{spec}]")
    else:
        assert expand(f"h[{spec}]") == [RangeHost(f"h{v}", (v,)) for v in values]
