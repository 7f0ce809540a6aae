#!/usr/bin/env bash
# Local services for development and CI, all on 127.0.0.1:
#   kafka      Tansu broker (memory storage) + topics $TOPIC and $DLQ_TOPIC
#   postgres   Debian PostgreSQL cluster, database $PG_DB, user postgres/$PG_PASSWORD
#   clickhouse Debian clickhouse-server, database $CH_DB
#   sqs        moto server (in a venv under .services/)
#
# Usage: scripts/services.sh up|down|status
#   up      install what is missing, start what is not running, wait until healthy
#   down    stop what is running (safe when nothing runs)
#   status  one line per service; exit 0 if all are up, 1 otherwise
#   stop S  stop one service (kafka, postgres, clickhouse, sqs); `up` restarts it
#
# State (logs, pid files, data, venv) lives in $ROOT/.services/.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
STATE="$ROOT/.services"

KAFKA_PORT="${KAFKA_PORT:-9092}"
PG_PORT="${PG_PORT:-5432}"
CLICKHOUSE_HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-8123}"
CLICKHOUSE_TCP_PORT="${CLICKHOUSE_TCP_PORT:-9000}"
CLICKHOUSE_INTERSERVER_PORT="${CLICKHOUSE_INTERSERVER_PORT:-9009}"
SQS_PORT="${SQS_PORT:-4566}"
TOPIC="${TOPIC:-events}"
DLQ_TOPIC="${DLQ_TOPIC:-events.dlq}"
PARTITIONS="${PARTITIONS:-6}"
PG_VERSION="${PG_VERSION:-15}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_PASSWORD="${PG_PASSWORD:-postgres}"
PG_DB="${PG_DB:-pipeline}"
CH_DB="${CH_DB:-pipeline}"

HOST=127.0.0.1
PG_URL="postgres://postgres:${PG_PASSWORD}@${HOST}:${PG_PORT}/${PG_DB}"
VENV="$STATE/venv"
CH_CONFIG=/etc/clickhouse-server/config.xml
PG_LOG="/var/log/postgresql/postgresql-${PG_VERSION}-${PG_CLUSTER}.log"

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:$HOME/.cargo/bin"

log() { echo "services: $*" >&2; }

die() {
    log "ERROR: $*"
    exit 1
}

# Print the last lines of the given log files (those that exist) to stderr.
show_logs() {
    local f
    for f in "$@"; do
        if [[ -s "$f" ]]; then
            echo "----- last 20 lines of $f -----" >&2
            tail -n 20 "$f" >&2
        fi
    done
}

fail_start() { # service, logs...
    local svc="$1"
    shift
    log "ERROR: $svc: failed to start"
    show_logs "$@"
    exit 1
}

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# True if something accepts TCP connections on 127.0.0.1:port.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# pid from a pid file if that process is alive and its command line matches.
pid_of() { # pidfile pattern
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(cat "$1" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2" || return 1
    echo "$pid"
}

# True while the process whose pid is in the pidfile exists.
pid_alive() { # pidfile
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# wait_healthy service deadline_s health_fn pidfile pattern logs...
# Polls health_fn until it succeeds; fails early if the process died.
wait_healthy() {
    local svc="$1" timeout="$2" check="$3" pidfile="$4" pattern="$5"
    local deadline=$((SECONDS + timeout))
    shift 5
    while ! "$check"; do
        # Alive, not "matches the pattern": right after the start the pid may
        # still be the forked shell, before it execs the server.
        if [[ -n "$pidfile" ]] && ! pid_alive "$pidfile"; then
            fail_start "$svc" "$@"
        fi
        if ((SECONDS >= deadline)); then
            log "ERROR: $svc: not healthy after ${timeout}s"
            # don't leave a half-started process of ours behind
            [[ -z "$pidfile" ]] || stop_pid "$svc" "$pidfile" "$pattern" 2>/dev/null
            fail_start "$svc" "$@"
        fi
        sleep 0.5
    done
}

# If our process runs but with other ports than now configured, stop it so
# that it gets restarted with the current configuration.
stop_if_reconfigured() { # service pidfile base_pattern full_pattern
    if pid_of "$2" "$3" >/dev/null && ! pid_of "$2" "$4" >/dev/null; then
        log "$1: running with a different configuration (ports), restarting"
        stop_pid "$1" "$2" "$3"
    fi
}

stop_pid() { # service pidfile pattern
    local svc="$1" pidfile="$2" pattern="$3" pid i
    if pid="$(pid_of "$pidfile" "$pattern")"; then
        log "$svc: stopping (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 60; i++)); do
            [[ -d "/proc/$pid" ]] || break
            sleep 0.5
        done
        if [[ -d "/proc/$pid" ]]; then
            log "$svc: still running after 30s, sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
        log "$svc: stopped"
    else
        log "$svc: not running (no live pid file)"
    fi
    rm -f "$pidfile"
}

# ---------------------------------------------------------------- installs

tansu_bin() {
    command -v tansu 2>/dev/null || {
        [[ -x "$HOME/.cargo/bin/tansu" ]] && echo "$HOME/.cargo/bin/tansu"
    }
}

apt_lists_fresh() {
    find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mtime -7 2>/dev/null | grep -q .
}

apt_install() {
    local opts=(-y -q -o DPkg::Lock::Timeout=600)
    if ! apt_lists_fresh; then
        log "apt: package lists missing or stale, running apt-get update"
        as_root apt-get update -q >"$STATE/apt.log" 2>&1 || {
            show_logs "$STATE/apt.log"
            die "apt: apt-get update failed"
        }
    fi
    if ! as_root apt-get install "${opts[@]}" "$@" >>"$STATE/apt.log" 2>&1; then
        log "apt: install failed, retrying after apt-get update"
        as_root apt-get update -q >>"$STATE/apt.log" 2>&1 || true
        as_root apt-get install "${opts[@]}" "$@" >>"$STATE/apt.log" 2>&1 || {
            show_logs "$STATE/apt.log"
            die "apt: apt-get install $* failed"
        }
    fi
    # The downloaded .deb files (ClickHouse's are large) are not needed again.
    as_root apt-get clean >/dev/null 2>&1 || true
}

install_missing() {
    local pkgs=()
    if [[ ! -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ]] || ! command -v pg_ctlcluster >/dev/null; then
        log "postgres: installing..."
        pkgs+=(postgresql)
    fi
    if ! command -v psql >/dev/null; then pkgs+=(postgresql-client); fi
    if ! command -v clickhouse-server >/dev/null; then
        log "clickhouse: installing..."
        pkgs+=(clickhouse-server)
    fi
    if ! command -v clickhouse-client >/dev/null; then pkgs+=(clickhouse-client); fi
    if ! command -v kcat >/dev/null; then
        log "kafka: installing kcat..."
        pkgs+=(kcat)
    fi
    if ! command -v curl >/dev/null; then pkgs+=(curl); fi
    if ((${#pkgs[@]})); then
        apt_install "${pkgs[@]}"
        log "apt: installed ${pkgs[*]}"
    fi

    install_tansu
    install_moto
}

install_tansu() {
    local deadline
    [[ -n "$(tansu_bin)" ]] && return 0
    # Another `cargo install tansu` (e.g. started by hand) is already running: wait for it.
    if command -v pgrep >/dev/null && pgrep -f 'cargo install .*tansu' >/dev/null; then
        log "kafka: another 'cargo install tansu' is running, waiting for it (up to 40 min)..."
        deadline=$((SECONDS + 2400))
        while pgrep -f 'cargo install .*tansu' >/dev/null && ((SECONDS < deadline)); do
            sleep 10
        done
        [[ -n "$(tansu_bin)" ]] && return 0
    fi
    command -v cargo >/dev/null || die "kafka: cargo not found (needed to install tansu)"
    log "kafka: installing tansu with 'cargo install tansu --features dynostore --locked' (takes ~15 min; log: $STATE/tansu-install.log)..."
    if ! cargo install tansu --features dynostore --locked >"$STATE/tansu-install.log" 2>&1; then
        show_logs "$STATE/tansu-install.log"
        die "kafka: cargo install tansu failed"
    fi
    [[ -n "$(tansu_bin)" ]] || die "kafka: tansu installed but not found on PATH or in ~/.cargo/bin"
}

install_moto() {
    local py=python3
    [[ -x "$VENV/bin/moto_server" ]] && return 0
    log "sqs: installing moto[server] into $VENV..."
    if [[ ! -x "$VENV/bin/pip" ]]; then
        rm -rf "$VENV"
        if ! command -v "$py" >/dev/null || ! "$py" -m venv "$VENV" >"$STATE/moto-install.log" 2>&1; then
            # Debian's python3 needs python3-venv for ensurepip.
            rm -rf "$VENV"
            apt_install python3-venv
            py=/usr/bin/python3
            "$py" -m venv "$VENV" >"$STATE/moto-install.log" 2>&1 || {
                show_logs "$STATE/moto-install.log"
                die "sqs: python3 -m venv failed"
            }
        fi
    fi
    if ! "$VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]' >>"$STATE/moto-install.log" 2>&1; then
        show_logs "$STATE/moto-install.log"
        die "sqs: pip install moto[server] failed"
    fi
}

# ---------------------------------------------------------------- kafka

KAFKA_PID="$STATE/tansu.pid"
KAFKA_LOG="$STATE/tansu.log"
# Debian's kcat (librdkafka 2.0.2) fails to parse Tansu's ApiVersions v3
# response ("Read underflow"); skipping the ApiVersions handshake
# (fallback 0.9.0) makes metadata listing (-L) work.
KCAT_OPTS=(-X api.version.request=false -X broker.version.fallback=0.9.0)

kafka_healthy() {
    port_open "$KAFKA_PORT" && kcat "${KCAT_OPTS[@]}" -b "$HOST:$KAFKA_PORT" -L -m 3 >/dev/null 2>&1
}

# "name partitions" per topic
kafka_topics() {
    kcat "${KCAT_OPTS[@]}" -b "$HOST:$KAFKA_PORT" -L -m 5 2>/dev/null |
        sed -n 's/^ *topic "\([^"]*\)" with \([0-9]*\) partitions.*/\1 \2/p'
}

kafka_up() {
    local pid tansu
    local me="listener-url=tcp://$HOST:$KAFKA_PORT "
    tansu="$(tansu_bin)"
    stop_if_reconfigured kafka "$KAFKA_PID" tansu "$me"
    if pid="$(pid_of "$KAFKA_PID" "$me")"; then
        wait_healthy kafka 60 kafka_healthy "$KAFKA_PID" "$me" "$KAFKA_LOG"
        log "kafka: already running (pid $pid)"
    elif port_open "$KAFKA_PORT"; then
        kafka_healthy || die "kafka: port $HOST:$KAFKA_PORT is taken by something that is not a Kafka broker"
        log "kafka: a broker not started by this script is already on $HOST:$KAFKA_PORT, using it"
    else
        rm -f "$KAFKA_PID"
        log "kafka: starting tansu broker..."
        nohup "$tansu" broker \
            --storage-engine=memory://tansu/ \
            --listener-url="tcp://$HOST:$KAFKA_PORT" \
            --advertised-listener-url="tcp://$HOST:$KAFKA_PORT" \
            >>"$KAFKA_LOG" 2>&1 </dev/null &
        echo $! >"$KAFKA_PID"
        wait_healthy kafka 60 kafka_healthy "$KAFKA_PID" "$me" "$KAFKA_LOG"
    fi
    kafka_topics_ensure "$tansu"
    log "kafka: up ($HOST:$KAFKA_PORT)"
}

kafka_topics_ensure() {
    local tansu="$1" existing t parts out
    existing="$(kafka_topics)"
    for t in "$TOPIC" "$DLQ_TOPIC"; do
        parts="$(awk -v t="$t" '$1 == t { print $2 }' <<<"$existing")"
        if [[ -n "$parts" ]]; then
            [[ "$parts" == "$PARTITIONS" ]] ||
                log "kafka: WARNING: topic $t exists with $parts partitions (wanted $PARTITIONS)"
            continue
        fi
        log "kafka: creating topic $t ($PARTITIONS partitions)"
        if ! out="$("$tansu" topic create "$t" --partitions "$PARTITIONS" --broker "tcp://$HOST:$KAFKA_PORT" 2>&1)"; then
            # tolerate a concurrent creation
            grep -qi 'exist' <<<"$out" || {
                echo "$out" >&2
                die "kafka: could not create topic $t"
            }
        fi
    done
    # Topic metadata can take a moment to show up.
    local deadline=$((SECONDS + 30))
    until existing="$(kafka_topics)" &&
        grep -q "^$TOPIC " <<<"$existing" && grep -q "^$DLQ_TOPIC " <<<"$existing"; do
        ((SECONDS < deadline)) || die "kafka: topics $TOPIC/$DLQ_TOPIC not visible in metadata after 30s"
        sleep 0.5
    done
}

kafka_status() {
    local n
    if kafka_healthy; then
        n="$(kafka_topics | wc -l)"
        echo "kafka: up ($HOST:$KAFKA_PORT, $n topics)"
    else
        echo "kafka: down ($HOST:$KAFKA_PORT)"
        return 1
    fi
}

# ---------------------------------------------------------------- postgres

pg_cluster_exists() {
    [[ -f "/etc/postgresql/$PG_VERSION/$PG_CLUSTER/postgresql.conf" ]]
}

pg_online() {
    pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" \
        '$1 == v && $2 == c && $4 ~ /^online/ { f = 1 } END { exit !f }'
}

pg_ready() {
    pg_isready -q -h "$HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1
}

pg_url_ok() {
    psql "$PG_URL" -XtAq -c 'select 1' >/dev/null 2>&1
}

pg_as_postgres() { # psql args...
    (cd / && as_root runuser -u postgres -- psql -X -q -p "$PG_PORT" -h /var/run/postgresql "$@")
}

pg_up() {
    local changed=0 cur
    if ! pg_cluster_exists; then
        log "postgres: creating cluster $PG_VERSION/$PG_CLUSTER"
        as_root pg_createcluster "$PG_VERSION" "$PG_CLUSTER" --port "$PG_PORT" >/dev/null
    fi
    # Listen on 127.0.0.1:$PG_PORT only.
    cur="$(pg_conftool -s "$PG_VERSION" "$PG_CLUSTER" show port 2>/dev/null || true)"
    if [[ "$cur" != "$PG_PORT" ]]; then
        as_root pg_conftool "$PG_VERSION" "$PG_CLUSTER" set port "$PG_PORT"
        changed=1
    fi
    # (pg_conftool does not quote 127.0.0.1, so use a conf.d drop-in.)
    local dropin="/etc/postgresql/$PG_VERSION/$PG_CLUSTER/conf.d/90-services-sh.conf"
    local want="listen_addresses = '$HOST'  # written by scripts/services.sh"
    if [[ "$(cat "$dropin" 2>/dev/null || true)" != "$want" ]]; then
        as_root mkdir -p "$(dirname "$dropin")"
        echo "$want" | as_root tee "$dropin" >/dev/null
        changed=1
    fi

    if pg_online; then
        if ((changed)); then
            log "postgres: configuration changed, restarting"
            as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" restart || fail_start postgres "$PG_LOG"
        else
            log "postgres: already running"
        fi
    else
        if port_open "$PG_PORT"; then
            die "postgres: port $HOST:$PG_PORT is taken by something that is not cluster $PG_VERSION/$PG_CLUSTER"
        fi
        log "postgres: starting cluster $PG_VERSION/$PG_CLUSTER..."
        as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start || fail_start postgres "$PG_LOG"
    fi
    wait_healthy postgres 60 pg_ready "" "" "$PG_LOG"

    if ! pg_url_ok; then
        log "postgres: setting password of user postgres, creating database $PG_DB"
        pg_as_postgres -c "ALTER USER postgres PASSWORD '$PG_PASSWORD'" >/dev/null
        if [[ "$(pg_as_postgres -tA -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]]; then
            pg_as_postgres -c "CREATE DATABASE \"$PG_DB\"" >/dev/null
        fi
        pg_url_ok || {
            psql "$PG_URL" -Xc 'select 1' >&2 || true
            die "postgres: cannot connect to $PG_URL"
        }
    fi
    log "postgres: up ($HOST:$PG_PORT, $PG_URL)"
}

pg_down() {
    if command -v pg_ctlcluster >/dev/null && pg_cluster_exists && pg_online; then
        log "postgres: stopping cluster $PG_VERSION/$PG_CLUSTER"
        as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop
        log "postgres: stopped"
    else
        log "postgres: not running"
    fi
}

pg_status() {
    if command -v psql >/dev/null && pg_url_ok; then
        echo "postgres: up ($HOST:$PG_PORT, $PG_URL)"
    else
        echo "postgres: down ($HOST:$PG_PORT)"
        return 1
    fi
}

# ---------------------------------------------------------------- clickhouse

CH_PID="$STATE/clickhouse.pid"
CH_LOG="$STATE/clickhouse.log"
CH_ERRLOG="$STATE/clickhouse.err.log"
CH_DATA="$STATE/clickhouse"

ch_healthy() {
    [[ "$(curl -sf --max-time 3 "http://$HOST:$CLICKHOUSE_HTTP_PORT/ping" 2>/dev/null)" == "Ok." ]]
}

ch_up() {
    local pid p
    local me="--http_port=$CLICKHOUSE_HTTP_PORT --tcp_port=$CLICKHOUSE_TCP_PORT --interserver_http_port=$CLICKHOUSE_INTERSERVER_PORT "
    stop_if_reconfigured clickhouse "$CH_PID" clickhouse-server "$me"
    if pid="$(pid_of "$CH_PID" "$me")"; then
        wait_healthy clickhouse 90 ch_healthy "$CH_PID" "$me" "$CH_LOG" "$CH_ERRLOG"
        log "clickhouse: already running (pid $pid)"
    elif port_open "$CLICKHOUSE_HTTP_PORT"; then
        ch_healthy || die "clickhouse: port $HOST:$CLICKHOUSE_HTTP_PORT is taken by something that is not ClickHouse"
        log "clickhouse: a server not started by this script is already on $HOST:$CLICKHOUSE_HTTP_PORT, using it"
    else
        rm -f "$CH_PID"
        for p in "$CLICKHOUSE_TCP_PORT" "$CLICKHOUSE_INTERSERVER_PORT"; do
            port_open "$p" && die "clickhouse: port $HOST:$p (native/interserver) is already taken"
        done
        mkdir -p "$CH_DATA"
        log "clickhouse: starting..."
        # Runs as the invoking user (root here) with data and logs under .services/.
        # The packaged config only listens on localhost when listen_host is unset;
        # we pin every port to 127.0.0.1 explicitly.
        (cd "$CH_DATA" && exec nohup clickhouse-server --config-file="$CH_CONFIG" -- \
            --path="$CH_DATA/" \
            --tmp_path="$CH_DATA/tmp/" \
            --user_files_path="$CH_DATA/user_files/" \
            --format_schema_path="$CH_DATA/format_schemas/" \
            --listen_host="$HOST" \
            --http_port="$CLICKHOUSE_HTTP_PORT" \
            --tcp_port="$CLICKHOUSE_TCP_PORT" \
            --interserver_http_port="$CLICKHOUSE_INTERSERVER_PORT" \
            --logger.log="$CH_LOG" \
            --logger.errorlog="$CH_ERRLOG" \
            >>"$CH_LOG" 2>&1 </dev/null) &
        echo $! >"$CH_PID"
        wait_healthy clickhouse 90 ch_healthy "$CH_PID" "$me" "$CH_LOG" "$CH_ERRLOG"
    fi
    curl -sf --max-time 10 --data-binary "CREATE DATABASE IF NOT EXISTS $CH_DB" \
        "http://$HOST:$CLICKHOUSE_HTTP_PORT/" >/dev/null ||
        die "clickhouse: CREATE DATABASE $CH_DB failed"
    log "clickhouse: up ($HOST:$CLICKHOUSE_HTTP_PORT)"
}

ch_status() {
    if ch_healthy; then
        echo "clickhouse: up (http://$HOST:$CLICKHOUSE_HTTP_PORT)"
    else
        echo "clickhouse: down (http://$HOST:$CLICKHOUSE_HTTP_PORT)"
        return 1
    fi
}

# ---------------------------------------------------------------- sqs (moto)

SQS_PIDF="$STATE/moto.pid"
SQS_LOG="$STATE/moto.log"

# moto routes unsigned requests to S3; a (fake) SigV4 header scoped to "sqs"
# makes it answer as SQS (moto does not verify signatures).
SQS_AUTH='Authorization: AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0'

sqs_healthy() {
    curl -sf --max-time 3 -H "$SQS_AUTH" "http://$HOST:$SQS_PORT/?Action=ListQueues" 2>/dev/null |
        grep -qE 'QueueUrls|ListQueuesResponse|^\{'
}

sqs_up() {
    local pid me="moto_server -H $HOST -p $SQS_PORT "
    stop_if_reconfigured sqs "$SQS_PIDF" moto_server "$me"
    if pid="$(pid_of "$SQS_PIDF" "$me")"; then
        wait_healthy sqs 60 sqs_healthy "$SQS_PIDF" "$me" "$SQS_LOG"
        log "sqs: already running (pid $pid)"
    elif port_open "$SQS_PORT"; then
        sqs_healthy || die "sqs: port $HOST:$SQS_PORT is taken by something that is not an SQS server"
        log "sqs: a server not started by this script is already on $HOST:$SQS_PORT, using it"
    else
        rm -f "$SQS_PIDF"
        log "sqs: starting moto_server..."
        nohup "$VENV/bin/moto_server" -H "$HOST" -p "$SQS_PORT" >>"$SQS_LOG" 2>&1 </dev/null &
        echo $! >"$SQS_PIDF"
        wait_healthy sqs 60 sqs_healthy "$SQS_PIDF" "$me" "$SQS_LOG"
    fi
    log "sqs: up (http://$HOST:$SQS_PORT)"
}

sqs_status() {
    if sqs_healthy; then
        echo "sqs: up (http://$HOST:$SQS_PORT)"
    else
        echo "sqs: down (http://$HOST:$SQS_PORT)"
        return 1
    fi
}

# ---------------------------------------------------------------- main

# Serialise `up`/`down`: re-run this script under `flock -o`, so the lock is
# held by flock itself and is NOT inherited by the daemons we start.
with_lock() { # command [args]
    local rc=0
    [[ -n "${SERVICES_SH_LOCKED:-}" ]] && return 0
    mkdir -p "$STATE"
    SERVICES_SH_LOCKED=1 flock -o -E 75 -w 1800 "$STATE/.lock" \
        bash "${BASH_SOURCE[0]}" "$@" || rc=$?
    ((rc != 75)) || die "another services.sh up/down is still running after 30 min (lock $STATE/.lock)"
    exit "$rc"
}

cmd_up() {
    local start=$SECONDS
    with_lock up
    install_missing
    kafka_up
    pg_up
    ch_up
    sqs_up
    log "all services up in $((SECONDS - start))s"
}

cmd_down() {
    with_lock down
    stop_pid sqs "$SQS_PIDF" moto_server
    stop_pid clickhouse "$CH_PID" clickhouse-server
    stop_pid kafka "$KAFKA_PID" tansu
    pg_down
}

# Stops one service (the recovery tests' database outage); `up` starts it again.
cmd_stop() {
    with_lock stop "$@"
    case "${1:-}" in
        kafka) stop_pid kafka "$KAFKA_PID" tansu ;;
        postgres) pg_down ;;
        clickhouse) stop_pid clickhouse "$CH_PID" clickhouse-server ;;
        sqs) stop_pid sqs "$SQS_PIDF" moto_server ;;
        *)
            echo "usage: $0 stop kafka|postgres|clickhouse|sqs" >&2
            exit 2
            ;;
    esac
}

cmd_status() {
    local rc=0
    if command -v kcat >/dev/null; then kafka_status || rc=1; else
        echo "kafka: down ($HOST:$KAFKA_PORT, kcat not installed)"
        rc=1
    fi
    pg_status || rc=1
    ch_status || rc=1
    sqs_status || rc=1
    return "$rc"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    stop) shift; cmd_stop "$@" ;;
    *)
        echo "usage: $0 up|down|status|stop <service>" >&2
        exit 2
        ;;
esac
