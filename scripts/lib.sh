# shellcheck shell=bash
# Helpers shared by scripts/run, scripts/test, scripts/check and scripts/broker.
# Source it; it defines functions and MDM_REPO / MDM_VAR and changes nothing else.
#
#   mdm_free_port              print a free TCP port on 127.0.0.1
#   mdm_ensure_apt PKG...      apt-get install the Debian packages that are missing
#   mdm_ensure_venv            .venv at the repo root with `pip install -e '.[test]'`
#                              (re-installed only when pyproject.toml changed)
#   mdm_ensure_postgres        export MDM_PG_ADMIN_URL (superuser DSN): the one given in
#                              MDM_PG_ADMIN_URL, or a server answering at PGHOST/PGPORT
#                              or 127.0.0.1:5432, else (or with MDM_PG_PRIVATE=1) a
#                              private cluster in var/pg (stopped on exit)
#   mdm_ensure_broker          start scripts/broker on free ports, export MDM_MQTT_URL
#                              (plain, loopback, with the server's MQTT user),
#                              MDM_MQTT_PUBLIC_URL and MDM_MQTT_PUBLIC_CA_FILE (its TLS
#                              listener and CA, for devices); stopped and removed on exit
#   mdm_pg_url_for DB [USER PW] MDM_PG_ADMIN_URL for database DB (as USER with PW)
#   mdm_redact_url URL         URL with its password replaced by *** (for logs)
#   mdm_ensure_browser         Debian's chromium and chromium-driver (the browser tests),
#                              export MDM_CHROMIUM and MDM_CHROMEDRIVER
#   mdm_on_exit CMD...         run CMD when the calling script exits (last in, first out)

MDM_REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
MDM_VAR="$MDM_REPO/var"

mdm_log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
mdm_die() { mdm_log "error: $*"; exit 1; }

# --- exit hooks ----------------------------------------------------------------
_mdm_exit_hooks=()

_mdm_run_exit_hooks() {
    local rc=$? i
    trap - EXIT INT TERM
    set +e
    for ((i = ${#_mdm_exit_hooks[@]} - 1; i >= 0; i--)); do
        eval "${_mdm_exit_hooks[i]}"
    done
    exit "$rc"
}

# mdm_on_exit CMD [ARG...]: the words are quoted now and run at exit.
mdm_on_exit() {
    local quoted
    printf -v quoted '%q ' "$@"
    _mdm_exit_hooks+=("$quoted")
    trap _mdm_run_exit_hooks EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Stop a process we started: SIGTERM, up to $2 seconds (default 20), then SIGKILL.
mdm_stop_pid() {
    local pid=$1 grace=${2:-20} i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        mdm_log "pid $pid still running after ${grace}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# --- small tools -----------------------------------------------------------------
mdm_python() {
    local py
    for py in python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

mdm_free_port() {
    "$(mdm_python)" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# mdm_wait_port HOST PORT SECONDS [PID]: wait until HOST:PORT accepts TCP connections;
# fail early if PID is given and exits.
mdm_wait_port() {
    local host=$1 port=$2 seconds=$3 pid=${4:-} i
    for ((i = 0; i < seconds * 10; i++)); do
        if "$(mdm_python)" -c 'import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()' \
            "$host" "$port" 2>/dev/null; then
            return 0
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.1
    done
    return 1
}

_mdm_as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        mdm_die "need root to run: $*"
    fi
}

# --- Debian packages -------------------------------------------------------------
_mdm_apt_updated=""

mdm_ensure_apt() {
    local pkg missing=()
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null 2>&1 || mdm_die "missing packages and no apt-get: ${missing[*]}"
    mdm_log "installing Debian packages: ${missing[*]}"
    # Another apt run (a second checkout setting itself up, unattended upgrades)
    # holds the dpkg lock for a while: wait for it rather than fail.
    if [[ -z "$_mdm_apt_updated" ]]; then
        _mdm_as_root apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
        _mdm_apt_updated=1
    fi
    _mdm_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        "${missing[@]}" >&2
}

# --- Python virtualenv -----------------------------------------------------------
mdm_ensure_venv() {
    local venv="$MDM_REPO/.venv" stamp want py
    stamp="$venv/.mdm-installed"
    want="$(sha256sum "$MDM_REPO/pyproject.toml" | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    py="$(mdm_python)" || { mdm_ensure_apt python3 python3-venv; py=python3; }
    if [[ ! -x "$venv/bin/python" ]]; then
        mdm_log "creating $venv"
        if ! "$py" -m venv "$venv" 2>/dev/null; then
            # Debian ships venv (ensurepip) separately.
            rm -rf "$venv"
            mdm_ensure_apt python3-venv
            "$py" -m venv "$venv"
        fi
    fi
    mdm_log "installing the project into $venv (pyproject.toml changed or first run)"
    (cd "$MDM_REPO" && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -e '.[test]' >&2)
    echo "$want" >"$stamp"
}

# --- PostgreSQL ------------------------------------------------------------------
# _mdm_pg_is_superuser DSN: true if DSN connects and its role is a superuser.
_mdm_pg_is_superuser() {
    local out
    out="$(PGCONNECT_TIMEOUT=3 psql "$1" -X -w -At -v ON_ERROR_STOP=1 \
        -c 'select rolsuper from pg_roles where rolname = current_user' 2>/dev/null)" || return 1
    [[ "$out" == t ]]
}

# _mdm_pg_bindir: directory of initdb/pg_ctl/postgres (newest Debian version first).
_mdm_pg_bindir() {
    local d
    while IFS= read -r d; do
        if [[ -x "$d/initdb" ]]; then
            echo "$d"
            return 0
        fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return 0
    fi
    return 1
}

# Run a PostgreSQL server binary as the user that owns the cluster: postgres refuses
# to run as root, so as root we use the "postgres" system user of the Debian package.
_mdm_pg_as_owner() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# _mdm_pg_root: where the private cluster lives. var/pg if the cluster's owner can
# use it, else a directory under /tmp whose path is recorded in var/pg.path.
_mdm_pg_root() {
    local root
    mkdir -p "$MDM_VAR"
    if [[ -f "$MDM_VAR/pg.path" ]]; then
        root="$(cat "$MDM_VAR/pg.path")"
        if [[ -d "$root" ]]; then
            echo "$root"
            return 0
        fi
    fi
    root="$MDM_VAR/pg"
    mkdir -p "$root"
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres: "$root"
        if ! runuser -u postgres -- test -w "$root"; then
            # The postgres user cannot reach var/ (a parent directory is closed to it).
            rmdir "$root"
            root="$(mktemp -d /tmp/mdm-pg.XXXXXX)"
            chown postgres: "$root"
        fi
    fi
    echo "$root" >"$MDM_VAR/pg.path"
    echo "$root"
}

_mdm_pg_stop() {
    _mdm_pg_as_owner "$1/pg_ctl" -D "$2/data" -m fast -w stop >/dev/null 2>&1 || true
}

mdm_ensure_postgres() {
    local candidates=() dsn user host port bindir root pid_line
    if [[ -n "${MDM_PG_ADMIN_URL:-}" ]]; then
        candidates+=("$MDM_PG_ADMIN_URL")
    fi
    command -v psql >/dev/null 2>&1 || mdm_ensure_apt postgresql-client
    if [[ "${MDM_PG_PRIVATE:-0}" != 1 ]]; then
        host="${PGHOST:-127.0.0.1}"
        port="${PGPORT:-5432}"
        for user in postgres "$(id -un)"; do
            if [[ "$host" == /* ]]; then
                candidates+=("postgresql://$user@/postgres?host=$host&port=$port")
            else
                candidates+=("postgresql://$user@$host:$port/postgres")
            fi
        done
        if [[ "$host:$port" != "127.0.0.1:5432" ]]; then
            candidates+=("postgresql://postgres@127.0.0.1:5432/postgres")
        fi
        for dsn in "${candidates[@]}"; do
            if _mdm_pg_is_superuser "$dsn"; then
                export MDM_PG_ADMIN_URL="$dsn"
                mdm_log "PostgreSQL: using $dsn"
                return 0
            fi
        done
    fi

    # No usable server: a private cluster of our own.
    if ! bindir="$(_mdm_pg_bindir)"; then
        mdm_ensure_apt postgresql
        bindir="$(_mdm_pg_bindir)" || mdm_die "PostgreSQL installed but initdb not found"
    fi
    root="$(_mdm_pg_root)"
    if [[ ! -f "$root/data/PG_VERSION" ]]; then
        mdm_log "PostgreSQL: creating a private cluster in $root/data"
        rm -rf "$root/data"
        _mdm_pg_as_owner "$bindir/initdb" -D "$root/data" -U postgres -A trust \
            -E UTF8 --no-locale >"$MDM_VAR/pg-initdb.log" 2>&1 ||
            { cat "$MDM_VAR/pg-initdb.log" >&2; mdm_die "initdb failed"; }
    fi
    _mdm_pg_as_owner mkdir -p "$root/sock"
    if _mdm_pg_as_owner "$bindir/pg_ctl" -D "$root/data" status >/dev/null 2>&1; then
        # Left running by an earlier run: reuse it (line 4 of postmaster.pid is the port).
        pid_line="$(sed -n 4p "$root/data/postmaster.pid")"
        port="$pid_line"
        mdm_log "PostgreSQL: private cluster already running on port $port"
    else
        port="$(mdm_free_port)"
        mdm_log "PostgreSQL: starting the private cluster on 127.0.0.1:$port"
        _mdm_pg_as_owner "$bindir/pg_ctl" -D "$root/data" -l "$root/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $root/sock" start >/dev/null ||
            { tail -n 30 "$root/server.log" >&2; mdm_die "PostgreSQL did not start"; }
        mdm_on_exit _mdm_pg_stop "$bindir" "$root"
    fi
    export MDM_PG_ADMIN_URL="postgresql://postgres@127.0.0.1:$port/postgres"
    _mdm_pg_is_superuser "$MDM_PG_ADMIN_URL" || mdm_die "cannot connect to $MDM_PG_ADMIN_URL"
}

# mdm_pg_url_for DB [USER PASSWORD]: MDM_PG_ADMIN_URL with its database replaced by
# DB (and its user by USER with PASSWORD, percent-encoded).
mdm_pg_url_for() {
    "$(mdm_python)" -c 'import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
p = p._replace(path="/" + sys.argv[2])
if len(sys.argv) > 3:
    host = p.netloc.rsplit("@", 1)[-1]
    user, password = (u.quote(v, safe="") for v in sys.argv[3:5])
    p = p._replace(netloc=f"{user}:{password}@{host}")
print(u.urlunsplit(p))' "$MDM_PG_ADMIN_URL" "$@"
}

# --- Browser (tests/browser) -----------------------------------------------------
# The pages are tested in a real headless Chromium driven through chromedriver: the
# machine's own Debian packages, never a browser downloaded at test time.
mdm_ensure_browser() {
    mdm_ensure_apt chromium chromium-driver
    export MDM_CHROMIUM="${MDM_CHROMIUM:-/usr/bin/chromium}"
    export MDM_CHROMEDRIVER="${MDM_CHROMEDRIVER:-/usr/bin/chromedriver}"
    [[ -x "$MDM_CHROMIUM" && -x "$MDM_CHROMEDRIVER" ]] ||
        mdm_die "chromium or chromedriver missing ($MDM_CHROMIUM, $MDM_CHROMEDRIVER)"
}

# --- Mosquitto -------------------------------------------------------------------
mdm_mosquitto_bin() {
    if command -v mosquitto >/dev/null 2>&1; then
        command -v mosquitto
    elif [[ -x /usr/sbin/mosquitto ]]; then
        echo /usr/sbin/mosquitto
    else
        return 1
    fi
}

# mdm_dynsec_plugin: path of Mosquitto's dynamic-security plugin (Debian puts it
# under the multiarch directory, the eclipse-mosquitto image in /usr/lib).
mdm_dynsec_plugin() {
    local p
    for p in /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so \
        /usr/local/lib/mosquitto_dynamic_security.so; do
        if [[ -f "$p" ]]; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# mdm_render_broker_config PORT BIND DATA_DIR USER LOG_DEST PLUGIN TLS_PORT TLS_BIND
#     CERTFILE KEYFILE: print the project's broker config
# (deploy/mosquitto/mosquitto.conf) with its @PLACEHOLDERS@ filled in (PORT and
# BIND: the plain listener; PLUGIN: path of mosquitto_dynamic_security.so;
# TLS_PORT, TLS_BIND, CERTFILE, KEYFILE: the TLS listener and its PEM files).
mdm_render_broker_config() {
    local conf
    conf="$(<"$MDM_REPO/deploy/mosquitto/mosquitto.conf")"
    # Quoted replacements: no pattern characters, no "&" substitution (bash 5.2).
    conf="${conf//@PORT@/"$1"}"
    conf="${conf//@BIND@/"$2"}"
    conf="${conf//@DATA_DIR@/"$3"}"
    conf="${conf//@USER@/"$4"}"
    conf="${conf//@LOG_DEST@/"$5"}"
    conf="${conf//@DYNSEC_PLUGIN@/"$6"}"
    conf="${conf//@TLS_PORT@/"$7"}"
    conf="${conf//@TLS_BIND@/"$8"}"
    conf="${conf//@TLS_CERTFILE@/"$9"}"
    conf="${conf//@TLS_KEYFILE@/"${10}"}"
    printf '%s\n' \
        "# GENERATED from deploy/mosquitto/mosquitto.conf by scripts/broker: edit that file." \
        "# docker.conf is regenerated with: scripts/broker --docker-config >deploy/mosquitto/docker.conf" \
        "" "$conf"
}

# mdm_new_secret: 32 random bytes, base64url without padding (safe inside a URL).
mdm_new_secret() {
    head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'
}

# Start our own broker (never the machine's) on free ports; export MDM_MQTT_URL (plain,
# on 127.0.0.1: the server's MQTT user and a password made for this broker; it never
# reaches a log or a file: scripts/broker's line that prints it is dropped here) and,
# from the lines scripts/broker prints, MDM_MQTT_PUBLIC_URL (its TLS listener, which
# enrollment gives devices) and MDM_MQTT_PUBLIC_CA_FILE (the broker's private CA).
mdm_ensure_broker() {
    local port tls_port dir pid password line i
    if ! mdm_mosquitto_bin >/dev/null; then
        mdm_ensure_apt mosquitto mosquitto-clients
    fi
    port="$(mdm_free_port)"
    tls_port="$(mdm_free_port)"
    while [[ "$tls_port" == "$port" ]]; do tls_port="$(mdm_free_port)"; done
    dir="$MDM_VAR/broker-$port"
    rm -rf "$dir"
    mkdir -p -m 700 "$dir"
    password="$(mdm_new_secret)"
    MDM_MQTT_SERVER_PASSWORD="$password" "$MDM_REPO/scripts/broker" --port "$port" \
        --tls-port "$tls_port" --dir "$dir" \
        > >(grep --line-buffered -v '^MDM_MQTT_URL=' >"$dir/broker.env") \
        2>"$dir/stderr.log" &
    pid=$!
    mdm_on_exit rm -rf "$dir"
    mdm_on_exit mdm_stop_pid "$pid" 20
    if ! mdm_wait_port 127.0.0.1 "$port" 15 "$pid" ||
        ! mdm_wait_port 127.0.0.1 "$tls_port" 15 "$pid"; then
        cat "$dir/stderr.log" "$dir/mosquitto.log" >&2 2>/dev/null || true
        mdm_die "the broker did not start on ports $port and $tls_port"
    fi
    export MDM_MQTT_URL="mqtt://mdm-server:$password@127.0.0.1:$port"
    unset MDM_MQTT_PUBLIC_URL MDM_MQTT_PUBLIC_CA_FILE
    for ((i = 0; i < 50; i++)); do
        [[ -n "${MDM_MQTT_PUBLIC_CA_FILE:-}" ]] && break
        while IFS= read -r line; do
            case "$line" in
                MDM_MQTT_PUBLIC_URL=*) export MDM_MQTT_PUBLIC_URL="${line#*=}" ;;
                MDM_MQTT_PUBLIC_CA_FILE=*) export MDM_MQTT_PUBLIC_CA_FILE="${line#*=}" ;;
            esac
        done <"$dir/broker.env"
        sleep 0.1
    done
    [[ "${MDM_MQTT_PUBLIC_URL:-}" == "mqtts://127.0.0.1:$tls_port" && \
        -s "${MDM_MQTT_PUBLIC_CA_FILE:-}" ]] ||
        mdm_die "scripts/broker did not print its TLS listener and CA (see $dir/broker.env)"
    mdm_log "MQTT broker: $(mdm_redact_url "$MDM_MQTT_URL") for the server, $MDM_MQTT_PUBLIC_URL" \
        "(CA $MDM_MQTT_PUBLIC_CA_FILE) for devices (pid $pid, data and log in $dir)"
}

# mdm_redact_url URL: URL with the password of its userinfo replaced by ***.
mdm_redact_url() {
    local url=$1
    if [[ "$url" =~ ^([a-z]+://[^:/@]+):[^@]*@(.*)$ ]]; then
        echo "${BASH_REMATCH[1]}:***@${BASH_REMATCH[2]}"
    else
        echo "$url"
    fi
}
