#!/usr/bin/env bash
# A three-host roost cluster on one machine, as root (README, "Cluster"):
#
#   scripts/cluster-demo.sh start   # PostgreSQL, a fabric, three host namespaces, three agents
#   scripts/cluster-demo.sh stop    # removes all of it: VMs, agents, namespaces, server, files
#
# PostgreSQL is Debian's (make setup installs it): a throwaway server made with initdb as the
# postgres user in $ROOST_CLUSTER_DIR/pg, listening only on a Unix socket there, fsync on.
# The "hosts" are network namespaces roost-h1..3 joined by veths to bridge `fabric` in namespace
# roost-fabric; host N's end, fabric0, holds its VTEP address 10.251.0.N/24. Each runs its own
# `roost serve --netns roost-hN` agent (host name hostN, label zone=a for host1, zone=b for the
# others) with its Unix socket at $ROOST_CLUSTER_DIR/hostN/api.sock, advertised to its peers.
# Every process is recorded by its PID in that directory and ended by it at stop.
set -eEuo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${ROOST_CLUSTER_DIR:-/tmp/roost-cluster}
VMM=${ROOST_CLUSTER_VMM:-qemu}  # this machine has no usable KVM: QEMU (TCG) runs the guests
# more serve flags for every agent, e.g. "--offline-after 5 --lost-after 30" to watch a host
# go offline and its VMs lost within a minute (the defaults are 20 and 300 s)
read -r -a SERVE_ARGS <<<"${ROOST_CLUSTER_SERVE_ARGS:-}"
HOSTS=(1 2 3)
FABRIC_NS=roost-fabric
ROOST=$ROOT/.venv/bin/roost
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)

say() { printf '%s\n' "$*"; }
label() { if [ "$1" = 1 ]; then echo zone=a; else echo zone=b; fi; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { cat "$1" 2>/dev/null || true; }
has_ns() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

wait_gone() {  # wait_gone PID SECONDS: until the process is gone (it is not our child)
    local pid=$1 tries=$(($2 * 10))
    while alive "$pid" && [ "$tries" -gt 0 ]; do sleep 0.1; tries=$((tries - 1)); done
    ! alive "$pid"
}

start() {
    [ "$(id -u)" = 0 ] || { say "run it as root"; exit 1; }
    [ -x "$PG_BIN/initdb" ] || { say "no PostgreSQL server: run make setup"; exit 1; }
    if [ -e "$DIR" ] || has_ns "$FABRIC_NS"; then
        say "$DIR or namespace $FABRIC_NS exists: run $0 stop first"
        exit 1
    fi
    trap 'trap - ERR; say "start failed: removing what it made"; stop; exit 1' ERR
    mkdir -p "$DIR/pg"
    chown postgres:postgres "$DIR/pg"

    say "PostgreSQL: initdb as postgres in $DIR/pg, a Unix socket only"
    setpriv --reuid postgres --regid postgres --clear-groups -- "$PG_BIN/initdb" \
        --pgdata "$DIR/pg/data" --username postgres --auth trust --encoding UTF8 \
        --locale C --no-sync >"$DIR/pg/initdb.log"
    setsid setpriv --reuid postgres --regid postgres --clear-groups -- "$PG_BIN/postgres" \
        -D "$DIR/pg/data" -c listen_addresses= -c "unix_socket_directories=$DIR/pg" \
        -c fsync=on -c max_connections=200 </dev/null >/dev/null 2>"$DIR/pg/server.log" &
    echo $! >"$DIR/pg/pid"
    until "$PG_BIN/pg_isready" -q -h "$DIR/pg"; do
        alive "$(pid_of "$DIR/pg/pid")" || { cat "$DIR/pg/server.log"; false; }
        sleep 0.2
    done
    "$PG_BIN/psql" -q -h "$DIR/pg" -U postgres -c 'CREATE DATABASE roost'
    local url="postgresql+psycopg://postgres@/roost?host=$DIR/pg"

    say "Fabric: namespace $FABRIC_NS with bridge fabric; hosts roost-h1..3 on veths"
    ip netns add "$FABRIC_NS"
    ip -n "$FABRIC_NS" link add fabric mtu 1500 type bridge
    ip -n "$FABRIC_NS" link set fabric up
    for n in "${HOSTS[@]}"; do
        ip netns add "roost-h$n"
        ip -n "$FABRIC_NS" link add "h$n" mtu 1500 type veth peer name fabric0 netns "roost-h$n"
        ip -n "$FABRIC_NS" link set "h$n" master fabric up
        ip -n "roost-h$n" addr add "10.251.0.$n/24" dev fabric0
        ip -n "roost-h$n" link set fabric0 up
        ip -n "roost-h$n" link set lo up
    done

    for n in "${HOSTS[@]}"; do
        local home="$DIR/host$n"
        mkdir -p "$home"
        say "Agent host$n: roost serve --netns roost-h$n --host-name host$n" \
            "--vtep-address 10.251.0.$n --host-label $(label "$n")"
        setsid "$ROOST" serve --netns "roost-h$n" \
            --state-dir "$home/state" --run-dir "$home/run" \
            --listen "unix://$home/api.sock" \
            --database-url "$url" \
            --host-name "host$n" --vtep-address "10.251.0.$n" \
            --advertise-api "unix://$home/api.sock" --host-label "$(label "$n")" \
            --vmm "$VMM" --firecracker "$ROOT/build/firecracker/firecracker" \
            ${SERVE_ARGS[@]+"${SERVE_ARGS[@]}"} \
            </dev/null >"$home/serve.log" 2>&1 &
        echo $! >"$home/pid"
    done
    for n in "${HOSTS[@]}"; do
        local home="$DIR/host$n" tries=600
        until curl -sf --unix-socket "$home/api.sock" http://roost/healthz >/dev/null; do
            if ! alive "$(pid_of "$home/pid")" || [ "$tries" = 0 ]; then
                tail -20 "$home/serve.log"
                false
            fi
            sleep 0.1
            tries=$((tries - 1))
        done
    done
    trap - ERR
    say "Ready. The agents' APIs (any one takes any request):"
    for n in "${HOSTS[@]}"; do say "  export ROOST_API=unix://$DIR/host$n/api.sock   # host$n"; done
}

stop() {
    # a frozen agent (SIGSTOP) answers nothing and ends only once thawed
    for n in "${HOSTS[@]}"; do
        pid=$(pid_of "$DIR/host$n/pid")
        if alive "$pid"; then kill -CONT "$pid"; fi
    done
    # every VM, through the first agent that answers (any agent reaches every host's VMs)
    for n in "${HOSTS[@]}"; do
        api="unix://$DIR/host$n/api.sock"
        if alive "$(pid_of "$DIR/host$n/pid")" && "$ROOST" --api "$api" host list >/dev/null 2>&1
        then
            for vm in $("$ROOST" --api "$api" vm list -q 2>/dev/null); do
                "$ROOST" --api "$api" vm stop "$vm" --force >/dev/null 2>&1 || true
                "$ROOST" --api "$api" vm rm "$vm" >/dev/null 2>&1 || true
            done
            break
        fi
    done
    for n in "${HOSTS[@]}"; do
        pid=$(pid_of "$DIR/host$n/pid")
        if alive "$pid"; then
            kill -TERM "$pid"
            wait_gone "$pid" 30 || { kill -KILL "$pid"; wait_gone "$pid" 5; }
        fi
    done
    # what still runs in a namespace (a VMM, the agent's supervisor), by PID; then the namespaces
    for ns in roost-h1 roost-h2 roost-h3 "$FABRIC_NS"; do
        if has_ns "$ns"; then
            for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
    done
    pid=$(pid_of "$DIR/pg/pid")
    if alive "$pid"; then
        kill -INT "$pid"  # a fast shutdown
        wait_gone "$pid" 30 || { kill -KILL "$pid"; wait_gone "$pid" 5; }
    fi
    rm -rf "$DIR"
    say "Stopped: no agent, VM, namespace, server or $DIR left"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    say "usage: $0 start|stop"
    exit 2
    ;;
esac
