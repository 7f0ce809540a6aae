#!/usr/bin/env bash
# Local services for development and CI, all on 127.0.0.1:
#   kafka      Apache Kafka $KAFKA_VERSION (KRaft, one node, jars from Maven
#              Central, log on disk) + topics $TOPIC and $DLQ_TOPIC, two listeners:
#              127.0.0.1:$KAFKA_PORT  PLAINTEXT, unauthenticated and all-powerful
#                (its principal User:ANONYMOUS is a super user): development, tests
#              127.0.0.1:$KAFKA_SASL_SSL_PORT  SASL_SSL: TLS (the server certificate
#                below), SASL SCRAM-SHA-512, ACLs (StandardAuthorizer; no ACL, no
#                access). Users and what their ACLs allow:
#                admin      everything (super user)
#                processor  topic $TOPIC: Read, Describe; topic $DLQ_TOPIC: Write,
#                           Read, Describe; group processor: Read, Describe
#                loadgen    topic $TOPIC: Write, Describe
#                and, for the tests' own topics and groups (prefixed ACLs):
#                processor  topics secured-src-*: Read, Describe; topics
#                           secured-dlq-*: Write, Read, Describe; groups
#                           secured-*: Read, Describe
#                loadgen    topics secured-src-*: Write, Describe
#                Each user's password (24 random letters and digits, NO trailing
#                newline, mode 0600) is in .services/kafka/users/<user>.password.
#                A client: security.protocol=SASL_SSL, sasl.mechanism(s)=SCRAM-SHA-512,
#                the CA .services/tls/ca.pem as its trust store.
#   postgres   Debian PostgreSQL cluster, database $PG_DB, user postgres/$PG_PASSWORD,
#              TLS on with the server certificate below (clients:
#              ?sslmode=verify-full&sslrootcert=.services/tls/ca.pem)
#   clickhouse Debian clickhouse-server, database $CH_DB, HTTP on
#              $CLICKHOUSE_HTTP_PORT and HTTPS on $CLICKHOUSE_HTTPS_PORT with the server
#              certificate below (clients: --clickhouse-ca-file .services/tls/ca.pem)
#   sqs        moto server (in a venv under .services/): SQS, and S3 on the same
#              port (the DLQ archive's bucket, made by `streamctl dlq archive
#              --create-bucket`)
#
# Test TLS material, for every service (Kafka's SASL_SSL listener now): made
# with openssl once, made again (all of it) when missing or when the server
# certificate expires within 30 days; in .services/tls/:
#   ca.pem, ca.key          the self-signed CA "stream-pipeline local test CA"
#                           (10 years): the one file a client trusts is ca.pem
#   server.pem, server.key  the server's certificate (signed by the CA, 2
#                           years, SAN DNS:localhost + IP:127.0.0.1, serverAuth)
#                           and its unencrypted PKCS#8 key
#   server.p12              that key + server.pem + ca.pem as a PKCS12 keystore
#                           (for Java), its password in keystore.password
# Key files and passwords are mode 0600.
#
# Usage: scripts/services.sh up|down|status
#   up      install what is missing, start what is not running, wait until healthy
#   down    stop what is running (safe when nothing runs)
#   status  one line per service; exit 0 if all are up, 1 otherwise
#   stop S  stop one service (kafka, postgres, clickhouse, sqs); `up` restarts it
#   start S start one installed service (kafka: the broker, its users and
#           ACLs, no topics)
#   kill kafka  SIGKILL the broker (a crash; `start kafka` brings it back)
#   freeze S / thaw S  SIGSTOP / SIGCONT postgres, clickhouse or kafka: a hung
#              server that keeps its connections open and answers nothing
#
# State (logs, pid files, data, venv) lives in $ROOT/.services/.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
STATE="$ROOT/.services"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9095}"
# Not 9093: the demo's Alertmanager listens on 127.0.0.1:9093 (scripts/demo.sh,
# observability/prometheus/prometheus.yml).
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-9094}"
KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
KAFKA_HEAP="${KAFKA_HEAP:-512m}"
PG_PORT="${PG_PORT:-5432}"
CLICKHOUSE_HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-8123}"
CLICKHOUSE_HTTPS_PORT="${CLICKHOUSE_HTTPS_PORT:-8443}"
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

# 24 random letters and digits, without a newline.
random_password() {
    python3 -c 'import secrets, string
a = string.ascii_letters + string.digits
print("".join(secrets.choice(a) for _ in range(24)), end="")'
}

# Writes stdin to the file, mode 0600 (through a temporary file and a rename).
write_secret() { # file
    local tmp="$1.tmp.$$"
    (umask 077 && cat >"$tmp") && mv -f "$tmp" "$1"
}

# ---------------------------------------------------------------- installs

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
    if ! command -v curl >/dev/null; then pkgs+=(curl); fi
    # librdkafka is built with OpenSSL (TLS, SASL SCRAM): its headers and
    # pkg-config, for the cargo builds that follow.
    if ! command -v pkg-config >/dev/null; then pkgs+=(pkg-config); fi
    if ! pkg-config --exists openssl 2>/dev/null; then pkgs+=(libssl-dev); fi
    if ! command -v openssl >/dev/null; then pkgs+=(openssl); fi
    if ((${#pkgs[@]})); then
        apt_install "${pkgs[@]}"
        log "apt: installed ${pkgs[*]}"
    fi

    install_kafka
    install_moto
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

# ---------------------------------------------------------------- tls
#
# A test CA and one server certificate for 127.0.0.1/localhost, shared by the
# services (see the header). Not Kafka's: nothing here names a service.

TLS_DIR="$STATE/tls"
TLS_LOG="$STATE/tls.log"
TLS_CA_SUBJECT="/CN=stream-pipeline local test CA"
TLS_CA_DAYS=3650
TLS_SERVER_DAYS=730
TLS_RENEW_BEFORE_S=$((30 * 86400))

# True if every file is there, the certificates are good for 30 more days,
# the server's is signed by the CA and server.key is its key.
tls_valid() {
    local d="$TLS_DIR" f
    for f in ca.pem ca.key server.pem server.key server.p12 keystore.password; do
        [[ -s "$d/$f" ]] || return 1
    done
    openssl x509 -checkend "$TLS_RENEW_BEFORE_S" -noout -in "$d/server.pem" >/dev/null 2>&1 &&
        openssl x509 -checkend "$TLS_RENEW_BEFORE_S" -noout -in "$d/ca.pem" >/dev/null 2>&1 &&
        openssl verify -CAfile "$d/ca.pem" "$d/server.pem" >/dev/null 2>&1 &&
        [[ "$(openssl x509 -noout -pubkey -in "$d/server.pem" 2>/dev/null)" == \
            "$(openssl pkey -pubout -in "$d/server.key" 2>/dev/null)" ]]
}

# Makes the CA, the server certificate and the PKCS12 keystore in dir (run
# in a subshell: it changes directory and umask). `|| return` on each step:
# set -e does not hold inside the caller's `if`.
tls_generate() { # dir
    local serial
    serial="0x$(openssl rand -hex 16)" || return
    cd "$1" || return
    umask 077
    openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days "$TLS_CA_DAYS" \
        -subj "$TLS_CA_SUBJECT" -keyout ca.key -out ca.pem \
        -addext 'basicConstraints=critical,CA:TRUE' \
        -addext 'keyUsage=critical,keyCertSign,cRLSign' || return
    openssl req -new -newkey rsa:2048 -nodes -sha256 -subj /CN=localhost \
        -keyout server.key -out server.csr || return
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
        'keyUsage=critical,digitalSignature,keyEncipherment' \
        'extendedKeyUsage=serverAuth' 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
        'subjectKeyIdentifier=hash' 'authorityKeyIdentifier=keyid' >server.ext
    openssl x509 -req -sha256 -days "$TLS_SERVER_DAYS" -in server.csr \
        -CA ca.pem -CAkey ca.key -set_serial "$serial" -extfile server.ext -out server.pem || return
    random_password >keystore.password || return
    openssl pkcs12 -export -name server -in server.pem -inkey server.key -certfile ca.pem \
        -passout file:keystore.password -out server.p12 || return
    rm -f server.csr server.ext
    chmod 0644 ca.pem server.pem
}

# The CA and the server certificate: made when missing or about to expire.
# A new keystore has a new password, so the broker's configuration changes
# and kafka_start restarts it with the new certificate.
tls_ensure() {
    local new="$STATE/tls.new"
    tls_valid && return 0
    log "tls: making a test CA and a server certificate (localhost, 127.0.0.1) in $TLS_DIR"
    rm -rf "$new"
    mkdir -p "$new"
    if ! (tls_generate "$new") >"$TLS_LOG" 2>&1; then
        show_logs "$TLS_LOG"
        die "tls: openssl failed"
    fi
    rm -rf "$TLS_DIR"
    mv "$new" "$TLS_DIR"
    tls_valid || die "tls: the new server certificate does not verify (log: $TLS_LOG)"
}

# ---------------------------------------------------------------- kafka
#
# Apache Kafka in KRaft mode: one node that is both broker and controller,
# its jars resolved from Maven Central (scripts/kafka/pom.xml), its log on
# disk under .services/kafka/data, so a broker restart keeps every record.
# Topics are created through the Kafka admin API by `streamctl topics
# ensure`, the same command the cluster's topic-init job runs. The SASL_SSL
# listener's users and ACLs are set by Kafka's own tools (ConfigCommand,
# AclCommand) over the PLAINTEXT listener, once per log directory: a stamp in
# it records what was set.

KAFKA_HOME="$STATE/kafka"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_DATA="$KAFKA_HOME/data"
KAFKA_CONFIG="$KAFKA_HOME/server.properties"
KAFKA_PID="$STATE/kafka.pid"
KAFKA_LOG="$STATE/kafka.log"
KAFKA_USERS_DIR="$KAFKA_HOME/users"
KAFKA_USERS=(admin processor loadgen)
KAFKA_AUTH_STAMP="$KAFKA_DATA/.services-sh-auth"
KAFKA_AUTH_LOG="$STATE/kafka-auth.log"

install_kafka() {
    local pom="$ROOT/scripts/kafka/pom.xml" stamp java_version
    # The pom's hash in the stamp: a changed pom resolves again.
    stamp="$KAFKA_LIBS/.resolved-$KAFKA_VERSION-$(sha256sum <"$pom" | cut -c1-12)"
    [[ -f "$stamp" ]] && return 0
    command -v java >/dev/null || die "kafka: java not found (Apache Kafka $KAFKA_VERSION needs Java 17 or newer)"
    java_version="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
    if ! [[ "${java_version%%.*}" =~ ^[0-9]+$ ]] || ((${java_version%%.*} < 17)); then
        die "kafka: java $java_version found; Apache Kafka $KAFKA_VERSION needs Java 17 or newer"
    fi
    command -v mvn >/dev/null || die "kafka: mvn not found (Maven resolves the Kafka jars from Maven Central)"
    log "kafka: resolving Apache Kafka $KAFKA_VERSION from Maven Central (log: $STATE/kafka-install.log)..."
    rm -rf "$KAFKA_LIBS"
    if ! mvn -B -q -f "$pom" -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" \
        >"$STATE/kafka-install.log" 2>&1; then
        show_logs "$STATE/kafka-install.log"
        die "kafka: mvn dependency:copy-dependencies failed"
    fi
    touch "$stamp"
    log "kafka: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $KAFKA_LIBS"
}

# The broker's configuration, on stdout. Local-development choices, each
# named: no wait before a new group's first rebalance, a small offsets topic,
# replication factor 1 (one node), and no topic created by a produce or a
# fetch, as in production. It holds the keystore's password: mode 0600.
kafka_properties() {
    local keystore_password
    keystore_password="$(cat "$TLS_DIR/keystore.password")" || die "kafka: no $TLS_DIR/keystore.password"
    cat <<PROPS
# Written by scripts/services.sh; edits are overwritten on the next 'up'.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,SASL_SSL://$HOST:$KAFKA_SASL_SSL_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT,SASL_SSL://$HOST:$KAFKA_SASL_SSL_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
# SASL_SSL: TLS with the test server certificate (no client certificates),
# then SCRAM-SHA-512 against the users in the cluster's metadata.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$TLS_DIR/server.p12
listener.name.sasl_ssl.ssl.keystore.password=$keystore_password
listener.name.sasl_ssl.ssl.client.auth=none
# ACLs decide, and no ACL means no access. User:ANONYMOUS is whoever comes in
# unauthenticated: on the PLAINTEXT listener (loopback only, the development
# and test listener, which thus stays all-powerful) and on the CONTROLLER
# listener (the broker itself). User:admin is the SASL_SSL super user.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS;User:admin
allow.everyone.if.no.acl.found=false
log.dirs=$KAFKA_DATA
num.partitions=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
offsets.topic.num.partitions=6
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
PROPS
}

kafka_healthy() {
    port_open "$KAFKA_PORT" && port_open "$KAFKA_SASL_SSL_PORT"
}

# True once the broker we started logged that it is up (its listener takes
# connections slightly before it can serve metadata).
kafka_started() {
    kafka_healthy && grep -q 'Kafka Server started' "$KAFKA_LOG" 2>/dev/null
}

kafka_format() {
    local cluster_id
    [[ -f "$KAFKA_DATA/meta.properties" ]] && return 0
    cluster_id="$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')"
    log "kafka: formatting the log directory $KAFKA_DATA (cluster $cluster_id)"
    mkdir -p "$KAFKA_DATA"
    java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" \
        kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_CONFIG" \
        >>"$STATE/kafka-format.log" 2>&1 || {
        show_logs "$STATE/kafka-format.log"
        die "kafka: kafka.tools.StorageTool format failed"
    }
}

kafka_up() {
    kafka_start
    kafka_auth_ensure
    kafka_topics_ensure
    log "kafka: up ($HOST:$KAFKA_PORT plaintext, $HOST:$KAFKA_SASL_SSL_PORT SASL_SSL)"
}

# Starts the broker (if it is not running) and waits until it serves.
kafka_start() {
    local pid me="kafka.Kafka $KAFKA_CONFIG" wanted
    mkdir -p "$KAFKA_HOME"
    wanted="$(kafka_properties)"
    if [[ "$(cat "$KAFKA_CONFIG" 2>/dev/null || true)" != "$wanted" ]]; then
        if pid_of "$KAFKA_PID" "$me" >/dev/null; then
            log "kafka: configuration changed (ports or keystore), restarting"
            stop_pid kafka "$KAFKA_PID" "$me"
        fi
        printf '%s\n' "$wanted" | write_secret "$KAFKA_CONFIG"
    fi
    if pid="$(pid_of "$KAFKA_PID" "$me")"; then
        wait_healthy kafka 90 kafka_healthy "$KAFKA_PID" "$me" "$KAFKA_LOG"
        log "kafka: already running (pid $pid)"
    elif port_open "$KAFKA_PORT"; then
        die "kafka: port $HOST:$KAFKA_PORT is taken by something this script did not start"
    elif port_open "$KAFKA_SASL_SSL_PORT"; then
        die "kafka: SASL_SSL port $HOST:$KAFKA_SASL_SSL_PORT is taken (set KAFKA_SASL_SSL_PORT)"
    elif port_open "$KAFKA_CONTROLLER_PORT"; then
        die "kafka: controller port $HOST:$KAFKA_CONTROLLER_PORT is taken (set KAFKA_CONTROLLER_PORT)"
    else
        kafka_format
        rm -f "$KAFKA_PID"
        [[ -f "$KAFKA_LOG" ]] && mv -f "$KAFKA_LOG" "$KAFKA_LOG.1"
        log "kafka: starting Apache Kafka $KAFKA_VERSION (KRaft, heap $KAFKA_HEAP)..."
        nohup java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -Djava.awt.headless=true \
            -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" \
            -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_CONFIG" \
            >>"$KAFKA_LOG" 2>&1 </dev/null &
        echo $! >"$KAFKA_PID"
        wait_healthy kafka 120 kafka_started "$KAFKA_PID" "$me" "$KAFKA_LOG"
        log "kafka: started (pid $(cat "$KAFKA_PID"))"
    fi
}

# The SASL_SSL listener's ACLs, one AclCommand run per line (its operations
# on each of its resources): principal, pattern type, operations, resources.
kafka_acl_spec() {
    cat <<SPEC
processor LITERAL Read,Describe topic=$TOPIC group=processor
processor LITERAL Write,Read,Describe topic=$DLQ_TOPIC
processor PREFIXED Read,Describe topic=secured-src- group=secured-
processor PREFIXED Write,Read,Describe topic=secured-dlq-
loadgen LITERAL Write,Describe topic=$TOPIC
loadgen PREFIXED Write,Describe topic=secured-src-
SPEC
}

# What the broker should have, one line each: "user NAME SHA-256(password)"
# and "acl SPEC-LINE". Also the stamp's content once it has it.
kafka_auth_wanted() {
    local u
    for u in "${KAFKA_USERS[@]}"; do
        echo "user $u $(sha256sum <"$KAFKA_USERS_DIR/$u.password" | cut -d' ' -f1)"
    done
    kafka_acl_spec | sed 's/^/acl /'
}

# Runs a Kafka tool class against the PLAINTEXT listener (a super user), its
# output appended to $KAFKA_AUTH_LOG. The JVM flags make a short run start
# faster.
kafka_tool_run() { # what class args...
    echo "+ $1" >>"$KAFKA_AUTH_LOG"
    java -Xshare:auto -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$ROOT/scripts/kafka/tools-log4j2.properties" \
        -cp "$KAFKA_LIBS/*" "$2" --bootstrap-server "$HOST:$KAFKA_PORT" "${@:3}" \
        >>"$KAFKA_AUTH_LOG" 2>&1 </dev/null
}

# kafka_tool_run, and dies if the tool failed.
kafka_tool() { # what class args...
    kafka_tool_run "$@" || {
        show_logs "$KAFKA_AUTH_LOG"
        die "kafka: $1 failed"
    }
}

kafka_acl() { # add|remove principal pattern-type operations resources...
    local action="$1" principal="$2" pattern="$3" ops r op args
    IFS=, read -ra ops <<<"$4"
    shift 4
    args=("--$action" --allow-principal "User:$principal" --resource-pattern-type "$pattern")
    [[ "$action" == remove ]] && args+=(--force)
    for op in "${ops[@]}"; do args+=(--operation "$op"); done
    for r in "$@"; do args+=("--${r%%=*}" "${r#*=}"); done
    kafka_tool "AclCommand ${args[*]}" org.apache.kafka.tools.AclCommand "${args[@]}"
}

# The SCRAM-SHA-512 users (a password file for each, made when missing) and
# the ACLs. JVM tools take seconds: only what differs from the stamp
# $KAFKA_AUTH_STAMP is done (new or changed users set, users no longer
# wanted deleted, ACLs added or removed), then the stamp is rewritten. The
# stamp lives in the log directory, so a formatted-again one is set up anew.
kafka_auth_ensure() {
    local u wanted have kind name rest start=$SECONDS
    mkdir -p "$KAFKA_USERS_DIR"
    for u in "${KAFKA_USERS[@]}"; do
        [[ -s "$KAFKA_USERS_DIR/$u.password" ]] || random_password | write_secret "$KAFKA_USERS_DIR/$u.password"
    done
    wanted="$(kafka_auth_wanted)"
    have="$(cat "$KAFKA_AUTH_STAMP" 2>/dev/null || true)"
    [[ "$wanted" == "$have" ]] && return 0
    log "kafka: setting SCRAM users and ACLs over PLAINTEXT (log: $KAFKA_AUTH_LOG)..."
    : >"$KAFKA_AUTH_LOG"
    # Gone from the spec: ACLs removed, users no longer listed deleted.
    while read -r kind name rest; do
        case "$kind" in
            acl)
                # shellcheck disable=SC2086  # the spec line's words
                kafka_acl remove "$name" $rest
                ;;
            user)
                # (A user already gone is what is wanted.)
                grep -q "^user $name " <<<"$wanted" ||
                    kafka_tool_run "ConfigCommand: delete user $name" org.apache.kafka.tools.ConfigCommand \
                        --alter --delete-config SCRAM-SHA-512 --entity-type users --entity-name "$name" ||
                    [[ "$(tail -n 20 "$KAFKA_AUTH_LOG")" == *"user credential that does not exist"* ]] || {
                    show_logs "$KAFKA_AUTH_LOG"
                    die "kafka: ConfigCommand: delete user $name failed"
                }
                ;;
        esac
    done < <(comm -23 <(sort <<<"$have") <(sort <<<"$wanted"))
    # New or changed: users (re)set, then ACLs added.
    while read -r kind name rest; do
        case "$kind" in
            acl)
                # shellcheck disable=SC2086  # the spec line's words
                kafka_acl add "$name" $rest
                ;;
            user)
                kafka_tool "ConfigCommand: set user $name" org.apache.kafka.tools.ConfigCommand \
                    --alter --add-config "SCRAM-SHA-512=[password=$(cat "$KAFKA_USERS_DIR/$name.password")]" \
                    --entity-type users --entity-name "$name"
                ;;
        esac
    done < <(comm -13 <(sort <<<"$have") <(sort <<<"$wanted") | sort -s -r -k1,1)
    printf '%s\n' "$wanted" | write_secret "$KAFKA_AUTH_STAMP"
    log "kafka: users ${KAFKA_USERS[*]} (passwords in $KAFKA_USERS_DIR) and ACLs set in $((SECONDS - start))s"
}

# streamctl of this checkout (built when missing or stale: cargo decides).
streamctl() {
    local profile_flag=() dir=debug
    if [[ "${STREAMCTL_PROFILE:-dev}" == release ]]; then profile_flag=(--release) dir=release; fi
    if ! (cd "$ROOT" && cargo build -q "${profile_flag[@]}" -p stream-bins --bin streamctl) \
        >"$STATE/streamctl-build.log" 2>&1; then
        show_logs "$STATE/streamctl-build.log"
        die "kafka: cannot build streamctl (needed to create the topics)"
    fi
    "$ROOT/target/$dir/streamctl" "$@"
}

kafka_topics_ensure() {
    if [[ ! -x "$ROOT/target/debug/streamctl" && "${STREAMCTL_PROFILE:-dev}" != release ]]; then
        log "kafka: building streamctl to create the topics (first time takes minutes; log: $STATE/streamctl-build.log)"
    fi
    streamctl topics ensure --brokers "$HOST:$KAFKA_PORT" --topic "$TOPIC" --dlq-topic "$DLQ_TOPIC" \
        --partitions "$PARTITIONS" --dlq-partitions "$PARTITIONS" >&2 ||
        die "kafka: could not create topics $TOPIC and $DLQ_TOPIC"
}

kafka_status() {
    if kafka_healthy; then
        echo "kafka: up ($HOST:$KAFKA_PORT plaintext, $HOST:$KAFKA_SASL_SSL_PORT SASL_SSL SCRAM-SHA-512, Apache Kafka $KAFKA_VERSION)"
    else
        echo "kafka: down ($HOST:$KAFKA_PORT plaintext, $HOST:$KAFKA_SASL_SSL_PORT SASL_SSL)"
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
    # TLS with the test CA's server certificate (.services/tls): copies the
    # postgres user owns (the server refuses a key others can read).
    local conf_dir="/etc/postgresql/$PG_VERSION/$PG_CLUSTER" f
    for f in server.pem server.key; do
        if ! as_root cmp -s "$TLS_DIR/$f" "$conf_dir/services-sh-$f"; then
            as_root install -o postgres -g postgres -m 0600 "$TLS_DIR/$f" "$conf_dir/services-sh-$f"
            changed=1
        fi
    done
    # (pg_conftool does not quote 127.0.0.1, so use a conf.d drop-in.)
    local dropin="$conf_dir/conf.d/90-services-sh.conf"
    local want
    want="$(printf '%s\n' "# written by scripts/services.sh" \
        "listen_addresses = '$HOST'" \
        "ssl = on" \
        "ssl_cert_file = '$conf_dir/services-sh-server.pem'" \
        "ssl_key_file = '$conf_dir/services-sh-server.key'")"
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
    local me="--http_port=$CLICKHOUSE_HTTP_PORT --https_port=$CLICKHOUSE_HTTPS_PORT --tcp_port=$CLICKHOUSE_TCP_PORT --interserver_http_port=$CLICKHOUSE_INTERSERVER_PORT "
    stop_if_reconfigured clickhouse "$CH_PID" clickhouse-server "$me"
    if pid="$(pid_of "$CH_PID" "$me")"; then
        wait_healthy clickhouse 90 ch_healthy "$CH_PID" "$me" "$CH_LOG" "$CH_ERRLOG"
        log "clickhouse: already running (pid $pid)"
    elif port_open "$CLICKHOUSE_HTTP_PORT"; then
        ch_healthy || die "clickhouse: port $HOST:$CLICKHOUSE_HTTP_PORT is taken by something that is not ClickHouse"
        log "clickhouse: a server not started by this script is already on $HOST:$CLICKHOUSE_HTTP_PORT, using it"
    else
        rm -f "$CH_PID"
        for p in "$CLICKHOUSE_HTTPS_PORT" "$CLICKHOUSE_TCP_PORT" "$CLICKHOUSE_INTERSERVER_PORT"; do
            port_open "$p" && die "clickhouse: port $HOST:$p (https/native/interserver) is already taken"
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
            --https_port="$CLICKHOUSE_HTTPS_PORT" \
            --tcp_port="$CLICKHOUSE_TCP_PORT" \
            --interserver_http_port="$CLICKHOUSE_INTERSERVER_PORT" \
            --openSSL.server.certificateFile="$TLS_DIR/server.pem" \
            --openSSL.server.privateKeyFile="$TLS_DIR/server.key" \
            --openSSL.server.dhParamsFile= \
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
    tls_ensure
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
    stop_pid kafka "$KAFKA_PID" "kafka.Kafka $KAFKA_CONFIG"
    pg_down
}

# Starts one service without installing anything (the broker-fault tests'
# restart of a killed broker; `kafka` creates no topics, but makes the TLS
# material, users and ACLs if they are missing).
cmd_start() {
    with_lock start "$@"
    case "${1:-}" in
        kafka)
            tls_ensure
            kafka_start
            kafka_auth_ensure
            ;;
        postgres)
            tls_ensure
            pg_up
            ;;
        clickhouse)
            tls_ensure
            ch_up
            ;;
        sqs) sqs_up ;;
        *)
            echo "usage: $0 start kafka|postgres|clickhouse|sqs" >&2
            exit 2
            ;;
    esac
}

# SIGKILLs the broker: a crash, not a shutdown (the broker-fault tests).
cmd_kill() {
    local pid
    with_lock kill "$@"
    [[ "${1:-}" == kafka ]] || {
        echo "usage: $0 kill kafka" >&2
        exit 2
    }
    if pid="$(pid_of "$KAFKA_PID" "kafka.Kafka $KAFKA_CONFIG")"; then
        log "kafka: SIGKILL (pid $pid)"
        kill -9 "$pid"
        while [[ -d "/proc/$pid" ]]; do sleep 0.1; done
    else
        log "kafka: not running"
    fi
    rm -f "$KAFKA_PID"
}

# Stops one service (the recovery tests' database outage); `up` starts it again.
cmd_stop() {
    with_lock stop "$@"
    case "${1:-}" in
        kafka) stop_pid kafka "$KAFKA_PID" "kafka.Kafka $KAFKA_CONFIG" ;;
        postgres) pg_down ;;
        clickhouse) stop_pid clickhouse "$CH_PID" clickhouse-server ;;
        sqs) stop_pid sqs "$SQS_PIDF" moto_server ;;
        *)
            echo "usage: $0 stop kafka|postgres|clickhouse|sqs" >&2
            exit 2
            ;;
    esac
}

# A hung server (the timeout tests): every process of the service stopped
# with SIGSTOP, its sockets open, nothing answered; `thaw` resumes it.
cmd_freeze() { signal_service STOP "$@"; }
cmd_thaw() { signal_service CONT "$@"; }

signal_service() { # STOP|CONT service
    local signal="$1" pid
    case "${2:-}" in
        postgres)
            # The postmaster and every backend: all processes named postgres
            # (this machine runs one cluster).
            pgrep -x postgres >/dev/null || die "postgres: not running"
            as_root pkill "-$signal" -x postgres
            ;;
        clickhouse)
            pid="$(pid_of "$CH_PID" clickhouse-server)" || die "clickhouse: not running"
            kill "-$signal" "$pid"
            ;;
        kafka)
            # The broker stops reading its sockets; what clients send waits
            # in the kernel's buffers and is handled at the thaw.
            pid="$(pid_of "$KAFKA_PID" "kafka.Kafka $KAFKA_CONFIG")" || die "kafka: not running"
            kill "-$signal" "$pid"
            ;;
        *)
            echo "usage: $0 freeze|thaw postgres|clickhouse|kafka" >&2
            exit 2
            ;;
    esac
    log "${2}: SIG$signal"
}

cmd_status() {
    local rc=0
    kafka_status || rc=1
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
    start) shift; cmd_start "$@" ;;
    kill) shift; cmd_kill "$@" ;;
    freeze) shift; cmd_freeze "$@" ;;
    thaw) shift; cmd_thaw "$@" ;;
    *)
        echo "usage: $0 up|down|status|stop <service>|start <service>|kill kafka|freeze <service>|thaw <service>" >&2
        exit 2
        ;;
esac
