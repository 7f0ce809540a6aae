#!/usr/bin/env bash
# Checks the observability assets under observability/:
#   - promtool check config / check rules / test rules (Prometheus config,
#     recording and alerting rules, their unit tests)
#   - amtool check-config, and that severity=page|ticket reach their receivers
#   - the Grafana dashboards: valid JSON with the expected datasource, every
#     panel query parses as PromQL (checked by promtool as recording rules),
#     and every metric name they use is exported (observability/exported-metrics.txt),
#     `up`, `ALERTS`, or recorded in prometheus/rules.yml
#   - the rules use only exported metrics, `up` and their own recorded series
# Installs promtool and amtool (Debian packages prometheus and
# prometheus-alertmanager) when they are missing. Runs no server.
# Prints one line per check and ends with "observability: N passed, M failed";
# exits 1 when any check failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OBS="$ROOT/observability"
PROM_DIR="$OBS/prometheus"
AM_CONFIG="$OBS/alertmanager/alertmanager.yml"
DASH_DIR="$OBS/grafana/dashboards"
EXPORTED="$OBS/exported-metrics.txt"

# shellcheck source-path=SCRIPTDIR source=lib/checks.sh
source "$ROOT/scripts/lib/checks.sh"

apt_lists_empty() {
  ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

ensure_tools() {
  if command -v promtool >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1; then
    return 0
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
  fi
  local packages=(prometheus prometheus-alertmanager)
  echo "installing ${packages[*]} (for promtool and amtool) with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  if apt_lists_empty; then
    "${sudo[@]}" apt-get update -qq
  fi
  if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >"$WORK/apt.log" 2>&1; then
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >"$WORK/apt.log" 2>&1 || {
      cat "$WORK/apt.log" >&2
      echo "cannot install ${packages[*]}" >&2
      exit 1
    }
  fi
}

# The dashboard and metric-name checks, in Python (standard library only).
cat >"$WORK/obscheck.py" <<'PY'
"""Helpers for check-observability.sh.

  dashboards RULES_OUT MAP_OUT DASHBOARD...  structure check; writes every
                                             panel query as a recording rule
  explain MAP PROMTOOL_OUTPUT                names dashboard and panel per error
  names EXPORTED RULES DASHBOARD...          metric names used by dashboards
  rule-names EXPORTED RULES                  metric names used by rules.yml
"""
import json
import os
import re
import sys

# Grafana's built-in interval variables, replaced before parsing.
GRAFANA_MACROS = re.compile(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?")
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring",
            "group_left", "group_right", "bool", "offset", "inf", "nan"}
SUFFIXES = ("_bucket", "_sum", "_count")


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def targets(path):
    """(panel title, panel id, refId, expr) of every target, and problems."""
    problems = []
    try:
        with open(path, encoding="utf-8") as f:
            board = json.load(f)
    except (OSError, ValueError) as error:
        return [], [f"not valid JSON: {error}"]
    if not board.get("title"):
        problems.append("no title")
    if not isinstance(board.get("schemaVersion"), int):
        problems.append("no schemaVersion")
    found = []
    for panel in panels(board.get("panels", [])):
        if panel.get("type") == "row":
            continue
        where = f'panel {panel.get("id")} "{panel.get("title", "")}"'
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if ds is not None and (not isinstance(ds, dict) or ds.get("uid") != "prometheus"
                                   or ds.get("type") != "prometheus"):
                problems.append(f"{where}: datasource {ds!r} is not {{type: prometheus, uid: prometheus}}")
        if not panel.get("targets"):
            problems.append(f"{where}: no targets")
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if not expr.strip():
                problems.append(f'{where} target {target.get("refId")}: empty expr')
                continue
            found.append((panel.get("title", ""), panel.get("id"), target.get("refId"), expr))
    return found, problems


def cmd_dashboards(rules_out, map_out, boards):
    mapping = {}
    lines = ["groups:", "  - name: dashboard-queries", "    rules:"]
    problems = []
    number = 0
    for path in boards:
        found, board_problems = targets(path)
        problems += [f"{os.path.basename(path)}: {p}" for p in board_problems]
        for title, panel_id, ref, expr in found:
            number += 1
            record = f"dashboard:check:{number}"
            mapping[record] = f'{os.path.basename(path)} panel {panel_id} "{title}" target {ref}: {expr}'
            lines.append(f"      - record: {record}")
            lines.append(f"        expr: {json.dumps(GRAFANA_MACROS.sub('5m', expr))}")
    if number == 0:
        problems.append("no panel queries found")
    with open(rules_out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(map_out, "w", encoding="utf-8") as f:
        json.dump(mapping, f)
    for problem in problems:
        print(problem)
    print(f"{number} queries from {len(boards)} dashboards")
    return 1 if problems else 0


def cmd_explain(map_path, output_path):
    with open(map_path, encoding="utf-8") as f:
        mapping = json.load(f)
    with open(output_path, encoding="utf-8") as f:
        output = f.read()
    named = 0
    for line in output.splitlines():
        match = re.search(r'"(dashboard:check:\d+)": (.*)', line)
        if match and match.group(1) in mapping:
            print(f"{mapping[match.group(1)]}\n  -> {match.group(2)}")
            named += 1
    if not named:
        print(output)
    return 0


def metric_names(expr):
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"@\s*(start\(\)|end\(\)|[\d.]+)", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", s):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def allowed_names(exported_path, rules_path):
    allowed = {"up", "ALERTS", "ALERTS_FOR_STATE"}
    with open(exported_path, encoding="utf-8") as f:
        for line in f:
            body, _, comment = line.partition("#")
            name = body.strip()
            if not name:
                continue
            allowed.add(name)
            if comment.strip() in ("histogram", "summary"):
                allowed.update(name + suffix for suffix in SUFFIXES)
    with open(rules_path, encoding="utf-8") as f:
        allowed.update(re.findall(r"^\s*-?\s*record:\s*['\"]?([\w:]+)", f.read(), re.M))
    return allowed


def report(uses, allowed, exported_path):
    bad = 0
    for where, expr in uses:
        unknown = sorted(metric_names(expr) - allowed)
        if unknown:
            bad += 1
            print(f"{where}: unknown metric {', '.join(unknown)} in: {expr}")
    if bad:
        print(f"allowed: the names in {exported_path}, up, ALERTS and series recorded in rules.yml")
    else:
        print(f"{len(uses)} queries use only known metrics")
    return 1 if bad else 0


def cmd_names(exported_path, rules_path, boards):
    allowed = allowed_names(exported_path, rules_path)
    uses = []
    for path in boards:
        found, _ = targets(path)
        uses += [(f'{os.path.basename(path)} panel {pid} "{title}" target {ref}', expr)
                 for title, pid, ref, expr in found]
    if not uses:
        print("no panel queries found")
        return 1
    return report(uses, allowed, exported_path)


def rule_exprs(rules_path):
    """(rule name, expr) from a rules file written with `expr: ...` or `expr: |`."""
    with open(rules_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    name = "?"
    i = 0
    while i < len(lines):
        line = lines[i]
        found = re.match(r"^\s*-?\s*(record|alert):\s*(\S+)", line)
        if found:
            name = found.group(2)
        found = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if found:
            indent, value = len(found.group(1)), found.group(2).strip()
            if value in ("|", ">", "|-", ">-", "|+", ">+"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip()
                                          or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                out.append((name, " ".join(block)))
                continue
            out.append((name, value.strip("'\"")))
        i += 1
    return out


def cmd_rule_names(exported_path, rules_path):
    allowed = allowed_names(exported_path, rules_path)
    uses = [(f"rules.yml {name}", expr) for name, expr in rule_exprs(rules_path)]
    if not uses:
        print("no rule expressions found")
        return 1
    return report(uses, allowed, exported_path)


def main(argv):
    command, args = argv[1], argv[2:]
    if command == "dashboards":
        return cmd_dashboards(args[0], args[1], args[2:])
    if command == "explain":
        return cmd_explain(args[0], args[1])
    if command == "names":
        return cmd_names(args[0], args[1], args[2:])
    if command == "rule-names":
        return cmd_rule_names(args[0], args[1])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
PY

obscheck() {
  python3 "$WORK/obscheck.py" "$@"
}

# Dashboard queries must parse: each becomes a recording rule and promtool
# checks the file; errors are reported with the dashboard and panel.
# Needs the files that "obscheck dashboards" (the structure check) writes.
dashboard_queries_parse() {
  if ! promtool check rules "$WORK/dashboards.rules.yml" >"$WORK/promtool.out" 2>&1; then
    obscheck explain "$WORK/dashboards.map.json" "$WORK/promtool.out"
    return 1
  fi
}

alertmanager_routes() {
  local severity receiver
  for severity in page ticket; do
    receiver="$severity"
    amtool config routes test --config.file="$AM_CONFIG" --verify.receivers="$receiver" \
      "severity=$severity" alertname=RouteCheck 2>/dev/null || {
      echo "severity=$severity does not reach receiver $receiver"
      return 1
    }
  done
  amtool config routes test --config.file="$AM_CONFIG" --verify.receivers=null \
    alertname=RouteCheck 2>/dev/null || {
    echo "an alert without severity does not reach the default receiver null"
    return 1
  }
}

ensure_tools
command -v python3 >/dev/null 2>&1 || { echo "python3 is needed for the dashboard checks" >&2; exit 1; }

shopt -s nullglob
dashboards=("$DASH_DIR"/*.json)
shopt -u nullglob

echo "promtool: $(promtool --version 2>&1 | head -n1)"
echo "amtool: $(amtool --version 2>&1 | head -n1)"

check "promtool check config observability/prometheus/prometheus.yml" \
  promtool check config "$PROM_DIR/prometheus.yml"
check "promtool check rules observability/prometheus/rules.yml" \
  promtool check rules "$PROM_DIR/rules.yml"
check "promtool test rules observability/prometheus/rules_test.yml" \
  promtool test rules "$PROM_DIR/rules_test.yml"
check "amtool check-config observability/alertmanager/alertmanager.yml" \
  amtool check-config "$AM_CONFIG"
check "alertmanager routes: severity=page -> page, severity=ticket -> ticket, else null" \
  alertmanager_routes
check "dashboards: ${#dashboards[@]} files of valid JSON, with title, schemaVersion, datasource uid prometheus" \
  obscheck dashboards "$WORK/dashboards.rules.yml" "$WORK/dashboards.map.json" "${dashboards[@]}"
check "dashboards: every panel query parses as PromQL (promtool check rules)" \
  dashboard_queries_parse
check "dashboards: metric names are exported, up, ALERTS or recorded in rules.yml" \
  obscheck names "$EXPORTED" "$PROM_DIR/rules.yml" "${dashboards[@]}"
check "rules.yml: metric names are exported, up or recorded in rules.yml" \
  obscheck rule-names "$EXPORTED" "$PROM_DIR/rules.yml"

echo "observability: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
