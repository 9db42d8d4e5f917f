"""``network.table``: a user's own measured links between sites in place of the reference's geo table, on the
clock (and so on the emulated links, which read the same ``stage_link``), and its refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from checkfree.model.presets import PRESETS
from checkfree.run.config import ConfigError
from checkfree.run.runconfig import load_run_config
from checkfree.simulation.cost import CostModel
from checkfree.simulation.networks import (
    GEO_LOCATIONS,
    GEO_TABLE,
    GiB,
    Link,
    NetworkConfig,
    read_table,
    stage_link,
    validate_network_config,
)
from tests.scripts import assert_refused, experiment

HEADER = "site_a,site_b,latency_ms,bandwidth_Mbps\n"
CONF = Path(__file__).resolve().parents[1] / "conf"


def write(tmp_path, text: str, name: str = "links.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_stage_k_runs_at_site_k_mod_n_and_each_pair_takes_its_row(tmp_path):
    # Three sites in order of first appearance: Oslo, Lima, Pune. 40 ms = 0.04 s; 100 Mb/s = 12.5e6 B/s.
    path = write(tmp_path, HEADER + "Oslo,Lima,40,100\nPune,Oslo, 120 ,8\nLima,Pune,200.5,0.5\n")
    assert read_table(path)[0] == ("Oslo", "Lima", "Pune")
    net = NetworkConfig(name="geo_distributed", table=path, latency_s=0.002, bandwidth_Bps=1e9)
    validate_network_config(net, 6)
    assert stage_link(net, 0, 1) == stage_link(net, 1, 0) == Link(0.04, 12.5e6)
    assert stage_link(net, 0, 2) == Link(0.12, 1e6)
    assert stage_link(net, 1, 5) == Link(0.2005, 62_500.0)  # stage 5 at site 5 % 3 = Pune
    assert stage_link(net, 0, 3) == Link(0.002, 1e9)  # stages 0 and 3 share Oslo: the intra-site link
    # link_scale slows the table's links as it does the reference's.
    slow = dataclasses.replace(net, link_scale=4.0)
    assert stage_link(slow, 0, 1) == Link(0.16, 12.5e6 / 4)


def test_the_reference_table_written_as_a_file_prices_as_the_reference(tmp_path):
    rows = [f"{a},{b},{GEO_TABLE[frozenset((a, b))][0]!r},{GEO_TABLE[frozenset((a, b))][1] * GiB / 125_000!r}\n"
            for i, a in enumerate(GEO_LOCATIONS) for b in GEO_LOCATIONS[i + 1:]]
    path = write(tmp_path, HEADER + "".join(rows))
    ours, reference = NetworkConfig(name="geo_distributed", table=path), NetworkConfig(name="geo_distributed")
    for a in range(7):
        for b in range(7):
            mine, theirs = stage_link(ours, a, b), stage_link(reference, a, b)
            assert mine.latency_s == pytest.approx(theirs.latency_s, rel=1e-12)
            assert mine.bandwidth_Bps == pytest.approx(theirs.bandwidth_Bps, rel=1e-12)
    m = PRESETS["llama_500m"]
    for schedule in ("in_order", "out_of_order"):
        assert CostModel(m, 4, 16, ours, replicas=4).iteration_seconds(schedule) == \
            pytest.approx(CostModel(m, 4, 16, reference, replicas=4).iteration_seconds(schedule), rel=1e-12)


@pytest.mark.parametrize("text, message", [
    ("", "its header must be site_a,site_b,latency_ms,bandwidth_Mbps, got an empty file"),
    ("a,b,ms,mbps\nX,Y,1,1\n", "its header must be site_a,site_b,latency_ms,bandwidth_Mbps, got a,b,ms,mbps"),
    (HEADER, "it has no rows: give the link of at least one pair of sites"),
    (HEADER + "X,Y,1,1\nY,Z,1,1\n", "and X-Z is missing"),
    (HEADER + "A,B,1,1\nC,D,1,1\nE,F,1,1\n", "and A-C, A-D, A-E and 9 more are missing"),
    (HEADER + "X,Y,1,1\nY,X,2,2\n", "row 3 gives the link Y-X a second time"),
    (HEADER + "X,X,1,1\n", "row 2: a link joins two different named sites, got 'X' and 'X'"),
    (HEADER + "X,Y,-1,1\n", "row 2: latency_ms=-1 must be a number of milliseconds from 0 to 1e+12"),
    (HEADER + "X,Y,1,0\n", "row 2: bandwidth_Mbps=0 must be a finite number of megabits per second"),
    (HEADER + "X,Y,1,inf\n", "row 2: bandwidth_Mbps=inf must be a finite number"),
    (HEADER + "X,Y,fast,1\n", "row 2: latency_ms='fast' must be a number"),
    (HEADER + "X,Y,1,lots\n", "row 2: bandwidth_Mbps='lots' must be a number"),
    (HEADER + "X,Y,1\n", "row 2 has 3 fields, the header 4"),
])
def test_a_bad_table_is_refused_in_one_sentence_naming_the_file_and_the_row(tmp_path, text, message):
    path = write(tmp_path, text, name=f"bad{abs(hash(text))}.csv")
    with pytest.raises(ConfigError, match="network.table=") as e:
        validate_network_config(NetworkConfig(name="geo_distributed", table=path), 6)
    assert message in str(e.value) and path in str(e.value) and "\n" not in str(e.value)


def test_an_edited_table_is_read_again_and_a_spreadsheet_s_byte_order_mark_is_no_header_error(tmp_path):
    import os

    path = write(tmp_path, "\ufeff" + HEADER + "X,Y,10,8\n")
    net = NetworkConfig(name="geo_distributed", table=path)
    assert stage_link(net, 0, 1) == Link(0.01, 1e6)
    with open(path, "w") as f:
        f.write(HEADER + "X,Y,20,16,\n")  # one field too many: refused, not the cached links
    os.utime(path, ns=(1, 1))
    with pytest.raises(ConfigError, match="row 2 has 5 fields"):
        validate_network_config(net, 6)
    write(tmp_path, HEADER + "X,Y,20,16\n")
    assert stage_link(net, 0, 1) == Link(0.02, 2e6)


def test_a_table_needs_the_geo_network_and_a_file_that_is_there(tmp_path):
    good = write(tmp_path, HEADER + "X,Y,1,1\n")
    with pytest.raises(ConfigError, match="network=single_cluster is one site; allowed here: null"):
        validate_network_config(NetworkConfig(name="single_cluster", table=good), 6)
    with pytest.raises(ConfigError, match="it cannot be read"):
        validate_network_config(NetworkConfig(name="geo_distributed", table=str(tmp_path / "none.csv")), 6)


def run_config(*overrides: str):
    """The run config Hydra composes from conf/ with ``overrides``, through the one gate every run passes."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return load_run_config(compose(config_name="config", overrides=list(overrides)))


def test_the_run_config_refuses_a_table_under_the_zone_failure_model(tmp_path):
    good = write(tmp_path, HEADER + "X,Y,1,1\n")
    with pytest.raises(ConfigError, match="failure=zone strikes the reference's 7 locations"):
        run_config("network=geo_distributed", f"network.table={good}", "failure=zone")
    run = run_config("network=geo_distributed", f"network.table={good}", "failure=poisson")
    assert stage_link(run.network, 0, 1) == Link(0.001, 125_000.0)


check = experiment("clock_check")


def test_the_clock_check_runs_a_held_out_table_in_an_out_of_its_own(tmp_path, capsys):
    table = tmp_path / "held_out.csv"
    table.write_text(HEADER + "X,Y,30,80\n")
    out = tmp_path / "held_out"
    assert check.links_of(table, out) == [f"network.table={table.resolve()}"]
    # The reference table's runs (the default --out) and an --out that holds another table's runs are refused.
    with pytest.raises(SystemExit):
        check.links_of(table, check.ROOT / "results" / "clock_check")
    assert "its runs need an --out of their own" in capsys.readouterr().err
    out.mkdir()
    (out / check.TABLE_MARK).write_text(json.dumps({"table": "other.csv", "sha256": "0" * 64}))
    # Another table's mark, but no run of it completed (a failed first attempt): the mended table may go on there.
    assert check.links_of(table, out) == [f"network.table={table.resolve()}"]
    done = out / "runs" / "clock_check" / "000_x"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(SystemExit):
        check.links_of(table, out)
    assert "holds runs on other links; allowed: another --out" in capsys.readouterr().err
    (out / check.TABLE_MARK).write_text("{")
    with pytest.raises(SystemExit):
        check.links_of(table, out)
    assert "table.json is not the file this script writes" in capsys.readouterr().err
    (out / check.TABLE_MARK).write_text(json.dumps({"table": "other.csv", "sha256": "0" * 64}))
    with pytest.raises(SystemExit):
        check.links_of(None, out)
    assert "holds runs on the links of table.json's table" in capsys.readouterr().err


def test_the_clock_check_refuses_a_bad_table_before_any_work(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "X,Y,1\n")
    assert_refused("clock_check", tmp_path / "out", ["--table", str(bad)], "row 2 has 3 fields, the header 4")
