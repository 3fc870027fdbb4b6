"""Configs are strict everywhere and YAML is bounded (issue 26, item 2): unknown sections and
top-level keys, values a config refuses, alias bombs, huge or deep documents, a file that is no file.
The CLI's side (a run's own config.yaml, a workflow given to a stage) is in tests/test_cli_config.py."""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

import pytest

from pipeline.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    load_config,
    parse_yaml,
    read_sections,
    resolve,
)
from pipeline.executor import ExecutorConfig
from pipeline.overseg.config import OversegConfig
from pipeline.render.config import RenderConfig


@dataclass(frozen=True)
class _Inner:
    k: int = 1
    ratios: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class _Cfg:
    name: str = "a"
    inner: _Inner = field(default_factory=_Inner)
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name == "bad":
            raise ValueError("name must not be 'bad'")


SECTIONS = {"render": RenderConfig, "overseg": OversegConfig, "executor": ExecutorConfig}


def _bomb(levels: int = 9, key: str = "pitches_deg") -> str:
    """A YAML "billion laughs": 9 levels of 9 aliases expand to 9**9 (387 million) values."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nrender:\n  {key}: *a{levels - 1}\n"


def test_an_alias_bomb_under_a_list_key_is_refused_at_once(tmp_path):
    """It produced a 226 MB error line and 1.35 GB of memory under a list-typed key."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than") as info:
        read_sections(path, SECTIONS, reads=("render",), flat="render")
    assert time.perf_counter() - start < 2.0
    assert len(str(info.value)) < 300 and str(path) in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024  # KiB: under 50 MiB more


def test_bounded_yaml_refuses_recursion_depth_and_size(tmp_path):
    with pytest.raises(ConfigError, match="refers to itself"):
        parse_yaml("a: &a [*a]\n", "x.yaml")
    with pytest.raises(ConfigError, match="nest|not valid YAML"):
        parse_yaml("[" * 3000 + "]" * 3000, "x.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("a: [" + "1, " * (MAX_CONFIG_BYTES // 3) + "1]\n")
    with pytest.raises(ConfigError, match="larger than a config"):
        load_config(RenderConfig, big)
    assert parse_yaml("x: &v [1, 2]\ny: *v\n", "ok.yaml") == {"x": [1, 2], "y": [1, 2]}  # modest aliases are fine


def test_a_config_that_is_no_regular_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(RenderConfig, "/dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(RenderConfig, tmp_path)


def test_values_cut_short_in_messages():
    with pytest.raises(ConfigError) as info:
        resolve(_Cfg, {"inner": {"ratios": [[1] * 100_000]}})
    assert len(str(info.value)) < 300 and "inner.ratios[0]" in str(info.value)


def test_unknown_and_misspelled_sections_are_named(tmp_path):
    """Unknown top-level keys and misspelled sections were ignored when a command read its section."""
    path = tmp_path / "c.yaml"
    path.write_text("rendr:\n  width: 100\nrender:\n  width: 64\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['rendr'\].*did you mean 'render'"):
        read_sections(path, SECTIONS, reads=("render",), flat="render")
    path.write_text("render:\n  width: 64\nverbose: true\n")
    with pytest.raises(ConfigError, match="verbose"):
        read_sections(path, SECTIONS, reads=("render",), flat="render")
    # a section the command does not use is checked all the same
    path.write_text("render:\n  width: 64\noverseg:\n  k_neighbors: 5\n")
    with pytest.raises(ConfigError, match="overseg.*k_neighbors.*did you mean 'k_neighbours'"):
        read_sections(path, SECTIONS, reads=("render",), flat="render")
    # a file with nothing for this command is not silently empty
    path.write_text("overseg:\n  k_neighbours: 12\n")
    with pytest.raises(ConfigError, match="nothing in it for this command"):
        read_sections(path, SECTIONS, reads=("render", "executor"), flat="render")
    path.write_text("render:\n  width: 64\nexecutor:\n  kind: sync\n")
    parts = read_sections(path, SECTIONS, reads=("render", "executor"), flat="render")
    assert parts == {"render": {"width": 64}, "executor": {"kind": "sync"}}


def test_a_file_without_sections_is_the_commands_own_config(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("width: 64\nheight: 48\n")
    assert load_config(RenderConfig, path, section="render").width == 64
    # keys of another section's config: said so
    path.write_text("k_neighbours: 12\n")
    with pytest.raises(ConfigError, match="a `overseg` config"):
        read_sections(path, SECTIONS, reads=("render",), flat="render")


def test_values_a_config_refuses_are_config_errors():
    """A __post_init__ ValueError was a traceback (exit 1) instead of one line (exit 2)."""
    with pytest.raises(ConfigError, match="name must not be 'bad'"):
        resolve(_Cfg, {}, ["name=bad"])
    with pytest.raises(ConfigError, match="k_neighbours"):
        resolve(OversegConfig, {}, ["k_neighbours=1"])
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        resolve(ExecutorConfig, {}, ["workers=-3"])


def test_override_keys_are_checked_where_they_point():
    with pytest.raises(ConfigError, match=r"override inner\.kk: unknown key 'kk'.*did you mean 'k'"):
        resolve(_Cfg, {}, ["inner.kk=3"])
    with pytest.raises(ConfigError, match="name is not a section"):
        resolve(_Cfg, {}, ["name.x=3"])
    assert resolve(_Cfg, {}, ["options.anything=3", "inner.k=4"]) == _Cfg(inner=_Inner(k=4), options={"anything": 3})
    flow_bomb = "[&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)) + "]"
    with pytest.raises(ConfigError, match="override inner.ratios: the document expands to more than"):
        resolve(_Cfg, {}, ["inner.ratios=" + flow_bomb])


def test_config_reads_from_a_pipe(tmp_path):
    """`--config <(...)` hands a pipe: read (bounded), not refused."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"width: 32\n")
    os.close(write_fd)
    try:
        assert load_config(RenderConfig, f"/dev/fd/{read_fd}").width == 32
    finally:
        os.close(read_fd)
