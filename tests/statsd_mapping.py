"""What prometheus/statsd_exporter makes of a StatsD line, re-implemented for the tests.

statsd_exporter (Go) cannot be installed on the test machines, and PyPI has no Python parser of
its mapping files (the package named `statsd-exporter` there is a StatsD client). So this module
implements the part of the exporter that decides a line's Prometheus name, type and labels, for
what deploy/k8s/statsd-exporter-mapping.yaml and the server use, following the exporter's source
(v0.30: pkg/line/line.go, pkg/mapper/mapper.go, pkg/mapper/fsm/fsm.go, pkg/mapper/escape.go,
pkg/exporter/exporter.go):

- the line: `name:value|type[|@rate][|#k:v,...]`, several `:`-separated values unless DogStatsD
  tags are present; DogStatsD tags become labels (key escaped, `k` without `:v` dropped), and so do
  Librato (`name#k=v`) and InfluxDB (`name,k=v`) name tags, all on by default in the exporter;
- glob rules: `*` stands for one whole dot-separated field and is captured; rules are tried
  before regex rules, the earliest matching rule wins;
- regex rules (`match_type: regex`): tried in file order, unanchored like Go's
  FindStringSubmatchIndex (the rules anchor themselves), `match_metric_type` checked after the
  match; names and labels expanded like Go's Regexp.ExpandString (`$1`, `${1}`, `$$`);
- labels from the rule override tags of the same name unless `honor_labels`; an unmatched line
  keeps its own name, escaped.

Python's `re` and Go's RE2 agree on the constructs the mapping uses (groups, `(?:...)?`, `.+`,
`[^.]`, escapes); a rule using anything else fails here (`compile_go_regex`) instead of passing.
Not implemented: observers (timers, histograms; the server sends none), `action: drop`, scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

STATSD_TYPES = {"c": "counter", "g": "gauge", "ms": "observer", "h": "observer", "d": "observer"}


@dataclass
class Event:
    name: str
    kind: str  # counter, gauge or observer, as the exporter's mapper calls them
    value: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Series:
    """What the exporter serves for one event: the Prometheus name, type and labels."""

    name: str
    kind: str
    labels: dict[str, str]
    help: str = ""
    ttl: str | None = None
    mapped: bool = True


def escape_metric_name(name: str) -> str:
    """pkg/mapper/escape.go: invalid characters become `_`, a leading digit gets one, and a `-`
    right after another `-` is dropped."""
    out = ["_"] if name[:1].isdigit() else []
    previous = ""
    for char in name:
        if char.isascii() and (char.isalnum() or char == "_"):
            out.append(char)
        elif not (char == "-" and previous == "-"):
            out.append("_")
        previous = char
    return "".join(out)


def _parse_tag(tag: str, separator: str, labels: dict[str, str]) -> None:
    key, sep, value = tag.partition(separator)
    if sep and key and value:
        labels[escape_metric_name(key)] = value  # else the exporter counts a tag error


def _name_and_tags(name: str, labels: dict[str, str]) -> str:
    for index, char in enumerate(name):
        if char in "#,":  # Librato and InfluxDB tags, both parsed by default
            for tag in name[index + 1 :].split(","):
                if tag:
                    _parse_tag(tag, "=", labels)
            return name[:index]
    return name


def parse_line(line: str) -> list[Event]:
    """pkg/line/line.go LineToEvents, for counters, gauges and the observer types."""
    name, sep, rest = line.partition(":")
    if not sep or not name:
        return []
    labels: dict[str, str] = {}
    name = _name_and_tags(name, labels)
    dogstatsd = "|#" in rest
    if dogstatsd and labels:
        return []  # mixed tagging styles: dropped
    samples = [rest] if dogstatsd else rest.split(":")
    events = []
    for sample in samples:
        parts = sample.split("|")
        if not 2 <= len(parts) <= 6 or parts[1] not in STATSD_TYPES:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        tags = dict(labels)
        for part in parts[2:]:
            if not part:
                break
            if part[0] == "@":
                rate = float(part[1:]) or 1.0
                if parts[1] == "c":
                    value /= rate
            elif part[0] == "#":
                for tag in part[1:].split(","):
                    _parse_tag(tag.removeprefix("#"), ":", tags)
            elif part.startswith("c:") and len(part) > 2:
                tags["container_id"] = part[2:]
            elif part[0] != "T":
                break
        else:
            events.append(Event(name, STATSD_TYPES[parts[1]], value, tags))
    return events


def compile_go_regex(pattern: str) -> re.Pattern[str]:
    """A regex rule, refused if it uses what RE2 and Python's re read differently."""
    for construct in ("(?=", "(?!", "(?<=", "(?<!", "(?P=", "\\Z", "\\A", "(?#"):
        assert construct not in pattern, f"{construct} in {pattern!r}: not RE2, or not the same"
    assert not re.search(r"\\\d", pattern), f"backreference in {pattern!r}: not RE2"
    return re.compile(pattern)


def go_expand(template: str, groups: list[str | None], named: dict[str, str | None]) -> str:
    """Go's Regexp.ExpandString: `$name` takes the longest run of letters, digits and `_`,
    `${name}` is explicit, `$$` is a `$`; a group that did not take part expands to nothing."""

    def value(key: str) -> str:
        if key.isdigit():
            index = int(key)
            return (groups[index] if index < len(groups) else None) or ""
        return named.get(key) or ""

    out, i = [], 0
    while i < len(template):
        char = template[i]
        if char != "$" or i + 1 == len(template):
            out.append(char)
            i += 1
            continue
        if template[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        if template[i + 1] == "{":
            end = template.find("}", i + 2)
            key = template[i + 2 : end] if end > 0 else ""
            if end < 0 or not re.fullmatch(r"\w+", key):
                out.append(char)
                i += 1
                continue
            out.append(value(key))
            i = end + 1
            continue
        found = re.match(r"\w+", template[i + 1 :])
        if not found:
            out.append(char)
            i += 1
            continue
        out.append(value(found.group()))
        i += 1 + found.end()
    return "".join(out)


# The exporter reads the file with yaml.UnmarshalStrict: an unknown key fails its start.
_TOP_KEYS = {"defaults", "mappings"}
_DEFAULT_KEYS = {
    "observer_type",
    "match_type",
    "glob_disable_ordering",
    "ttl",
    "summary_options",
    "histogram_options",
}
_RULE_KEYS = {
    "match",
    "name",
    "labels",
    "honor_labels",
    "observer_type",
    "match_type",
    "help",
    "action",
    "match_metric_type",
    "ttl",
    "summary_options",
    "histogram_options",
    "scale",
}
_TEMPLATE = r"\$\{?\w+\}?"
_NAME = re.compile(rf"([a-zA-Z_]|{_TEMPLATE})([a-zA-Z0-9_]|{_TEMPLATE})*")  # mapper.go
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")  # Go's time.ParseDuration


class Mapper:
    """The mapping file's rules: `series(line)` is what the exporter serves for each event.
    Loading checks what the exporter checks at start (unknown keys, names, label keys, ttl)."""

    def __init__(self, config: dict[str, Any] | str) -> None:
        if isinstance(config, str):
            config = yaml.safe_load(config)
        assert set(config) <= _TOP_KEYS, set(config) - _TOP_KEYS
        defaults = config.get("defaults") or {}
        assert set(defaults) <= _DEFAULT_KEYS, set(defaults) - _DEFAULT_KEYS
        self.default_type = defaults.get("match_type", "glob")
        self.default_ttl = defaults.get("ttl")
        self.rules = []
        for rule in config["mappings"]:
            assert set(rule) <= _RULE_KEYS, set(rule) - _RULE_KEYS
            assert _NAME.fullmatch(rule["name"]), rule["name"]
            assert all(_LABEL.fullmatch(key) for key in rule.get("labels") or {}), rule
            assert rule.get("match_metric_type", "gauge") in ("counter", "gauge", "observer")
            assert "ttl" not in rule or _DURATION.fullmatch(str(rule["ttl"])), rule["ttl"]
            rule = dict(rule)
            rule.setdefault("match_type", self.default_type)
            if rule["match_type"] == "regex":
                rule["_regex"] = compile_go_regex(rule["match"])
            else:
                assert rule["match_type"] == "glob", rule
            assert rule.get("action", "map") == "map", "only mapping rules are implemented"
            self.rules.append(rule)

    def _glob(self, name: str, kind: str) -> tuple[dict, list[str]] | None:
        fields = name.split(".")
        for rule in self.rules:  # the FSM returns the earliest matching rule
            if rule["match_type"] != "glob" or rule.get("match_metric_type", kind) != kind:
                continue
            pattern = rule["match"].split(".")
            if len(pattern) != len(fields):
                continue
            captures = []
            for want, got in zip(pattern, fields, strict=True):
                if want == "*":
                    captures.append(got)
                elif want != got:
                    break
            else:
                return rule, captures
        return None

    def mapping(self, name: str, kind: str) -> tuple[dict, str, dict[str, str]] | None:
        """pkg/mapper GetMapping: (rule, expanded name, rule labels), or None if unmapped."""
        found = self._glob(name, kind)
        if found:
            rule, captures = found
            groups: list[str | None] = [name, *captures]
            expand = lambda text: go_expand(text, groups, {})  # noqa: E731
        else:
            for rule in self.rules:
                if rule["match_type"] != "regex":
                    continue
                match = rule["_regex"].search(name)
                if match is None:
                    continue
                if rule.get("match_metric_type", kind) != kind:
                    continue
                groups = [match.group(0), *match.groups()]
                named = match.groupdict()
                expand = lambda text, g=groups, n=named: go_expand(text, g, n)  # noqa: E731
                break
            else:
                return None
        labels = {key: expand(str(value)) for key, value in (rule.get("labels") or {}).items()}
        return rule, expand(rule["name"]), labels

    def series(self, line: str) -> list[Series]:
        """pkg/exporter handleEvent, for each event of the line."""
        out = []
        for event in parse_line(line):
            labels = dict(event.labels)
            found = self.mapping(event.name, event.kind)
            if found is None:
                out.append(Series(escape_metric_name(event.name), event.kind, labels, mapped=False))
                continue
            rule, name, rule_labels = found
            for key, value in rule_labels.items():
                if not (rule.get("honor_labels") and key in labels):
                    labels[key] = value
            ttl = rule.get("ttl", self.default_ttl)
            out.append(
                Series(escape_metric_name(name), event.kind, labels, rule.get("help", ""), ttl)
            )
        return out


def scraped_labels(labels: dict[str, str]) -> dict[str, str]:
    """Prometheus drops a label whose value is empty when it scrapes (an empty value and no
    label are the same series), e.g. the prefix label of a server without a prefix."""
    return {key: value for key, value in labels.items() if value}
