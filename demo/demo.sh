#!/usr/bin/env bash
# The l4proxy demo: three hosts in network namespaces, l4proxy on the middle one.
# Act 1: l4proxy owns the service prefixes 192.0.2.0/24 and 2001:db8:a::/64.
# Act 2: the middle host is a router; l4proxy intercepts the client's
# connections to the server's own addresses on port 80 and passes them on
# from the client's address (fully transparent).
# Act 3: a Linux bridge host is put into the client's cable (the client and
# the proxy host, now just its router, keep their addresses and routes);
# l4proxy on the bridge intercepts port 80 the same way.
#
#   client (198.51.100.2, 2001:db8:c::2)
#     |
#   proxy  (198.51.100.1, 2001:db8:c::1 | 203.0.113.1, 2001:db8:5::1)  <- l4proxy
#     |
#   server (203.0.113.2, 2001:db8:5::2): nginx on :8080 (site A), :8081 (site B)
#                                        and :80 (site C)
#
# Usage: demo.sh L4PROXY_BINARY POLICY GATEWAY_POLICY BRIDGED_POLICY
#        (run by `cargo xtask demo`)
# Everything it creates lives in namespaces named l4demo-<pid>-*, removed on exit.
set -euo pipefail

l4proxy=$(realpath "$1")
policy=$(realpath "$2")
gateway_policy=$(realpath "$3")
bridged_policy=$(realpath "$4")
tag="l4demo-$$"
work=$(mktemp -d)
chmod 755 "$work" # nginx's workers (user nobody) read the sites from here
cl="$tag-client" px="$tag-proxy" sv="$tag-server" br="$tag-bridge"
daemon_pid=""

# Kills what runs in namespace $1 (nginx, a daemon's crash guard) and
# deletes it.
remove_ns() {
    for p in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$1" 2>/dev/null || true
}

# What an earlier run that was cut short left.
for ns in $(ip netns list | awk '{print $1}' | grep '^l4demo-' || true); do
    pid=${ns#l4demo-}
    kill -0 "${pid%%-*}" 2>/dev/null || remove_ns "$ns"
done

cleanup() {
    local status=$?
    # Not cut short by a second Ctrl-C or a failing command.
    trap '' INT TERM
    set +e
    if [[ $status -ne 0 ]]; then
        [[ -s $work/l4proxy.log ]] && { echo "--- the demo failed; l4proxy's log:"; tail -n 30 "$work/l4proxy.log"; }
        [[ -s $work/nginx-error.log ]] && { echo "--- nginx's error log:"; tail -n 10 "$work/nginx-error.log"; }
    fi
    # A running daemon gets its stop (it removes what it set up), for 5 s.
    if [[ -n $daemon_pid ]] && kill -TERM "$daemon_pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    fi
    for ns in "$cl" "$px" "$sv" "$br"; do remove_ns "$ns"; done
    rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

say "building the lab: $cl, $px, $sv"
for ns in "$cl" "$px" "$sv"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done
ip -n "$cl" link add to-px type veth peer name to-cl netns "$px"
ip -n "$px" link add to-sv type veth peer name to-px netns "$sv"
ip -n "$cl" addr add 198.51.100.2/24 dev to-px
ip -n "$cl" addr add 2001:db8:c::2/64 dev to-px nodad
ip -n "$px" addr add 198.51.100.1/24 dev to-cl
ip -n "$px" addr add 2001:db8:c::1/64 dev to-cl nodad
ip -n "$px" addr add 203.0.113.1/24 dev to-sv
ip -n "$px" addr add 2001:db8:5::1/64 dev to-sv nodad
ip -n "$sv" addr add 203.0.113.2/24 dev to-px
ip -n "$sv" addr add 2001:db8:5::2/64 dev to-px nodad
for link in "$cl to-px" "$px to-cl" "$px to-sv" "$sv to-px"; do
    set -- $link
    ip -n "$1" link set "$2" up
done
ip -n "$cl" route add 192.0.2.0/24 via 198.51.100.1
ip -n "$cl" route add 2001:db8:a::/64 via 2001:db8:c::1
ip -n "$cl" route add 203.0.113.0/24 via 198.51.100.1
ip -n "$cl" route add 2001:db8:5::/64 via 2001:db8:c::1
ip netns exec "$px" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ip -n "$sv" route add default via 203.0.113.1
ip -n "$sv" route add default via 2001:db8:5::1

say "starting nginx on the server: site A on :8080, site B on :8081, site C on :80"
mkdir -p "$work/a" "$work/b" "$work/c"
echo "hello from site A" >"$work/a/index.html"
echo "hello from site B" >"$work/b/index.html"
echo "hello from site C" >"$work/c/index.html"
cat >"$work/nginx.conf" <<CONF
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events {}
http {
    access_log $work/nginx-access.log;
    # Its temporary files here too, not under /var/lib/nginx.
    client_body_temp_path $work/tmp-body;
    proxy_temp_path $work/tmp-proxy;
    fastcgi_temp_path $work/tmp-fastcgi;
    uwsgi_temp_path $work/tmp-uwsgi;
    scgi_temp_path $work/tmp-scgi;
    server { listen 8080; listen [::]:8080; root $work/a; }
    server { listen 8081; listen [::]:8081; root $work/b; }
    server { listen 80; listen [::]:80; root $work/c; }
}
CONF
ip netns exec "$sv" nginx -c "$work/nginx.conf"

# Starts l4proxy in namespace $2 (default: the proxy's) with policy $1 and
# waits for `ready`.
start_l4proxy() {
    local ns=${2:-$px}
    say "the policy ($1)"
    cat "$1"
    show "$l4proxy" check "$1"
    say "starting l4proxy in $ns"
    : >"$work/l4proxy.log"
    ip netns exec "$ns" "$l4proxy" run --policy "$1" --grace-period 2 2>"$work/l4proxy.log" &
    daemon_pid=$!
    for _ in $(seq 50); do
        grep -q ready "$work/l4proxy.log" && break
        kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/l4proxy.log"; exit 1; }
        sleep 0.1
    done
    grep -q ready "$work/l4proxy.log" || { cat "$work/l4proxy.log"; echo "l4proxy did not start"; exit 1; }
    cat "$work/l4proxy.log"
}

stop_l4proxy() {
    say "stopping l4proxy (SIGTERM)"
    kill -TERM "$daemon_pid"
    wait "$daemon_pid"
    daemon_pid=""
    tail -n 10 "$work/l4proxy.log" | grep -v '^$' || true
}

say "ACT 1: l4proxy owns the service prefixes"
start_l4proxy "$policy"

say "what l4proxy installed in the proxy namespace (no iptables, no nft)"
show ip -n "$px" route show table local proto 244
show ip -n "$px" -6 route show table local proto 244
bpftool link show 2>/dev/null | grep -A1 sk_lookup || true

say "the client connects to addresses in the service prefixes"
show ip netns exec "$cl" curl -sS --max-time 5 http://192.0.2.10/
show ip netns exec "$cl" curl -sS --max-time 5 http://192.0.2.77/
show ip netns exec "$cl" curl -sS --max-time 5 "http://[2001:db8:a::10]/"
show ip netns exec "$cl" curl -sS --max-time 5 http://192.0.2.20:8000/
show ip netns exec "$cl" curl -sS --max-time 5 "http://[2001:db8:a::20]:8999/"
show ip netns exec "$cl" curl -sS --max-time 5 http://192.0.2.20:8000/

say "a port no rule names is not steered (nothing listens there: refused)"
if ip netns exec "$cl" curl -sS --max-time 5 http://192.0.2.10:2222/; then
    echo "unexpected: port 2222 answered"; exit 1
fi

say "what the server saw (the proxy's address: act 1 is not transparent)"
cat "$work/nginx-access.log"
stop_l4proxy
show ip -n "$px" route show table local proto 244
[[ -z $(ip -n "$px" route show table local proto 244; ip -n "$px" -6 route show table local proto 244) ]] ||
    { echo "unexpected: routes left"; exit 1; }
echo "(no routes of ours left)"

say "ACT 2: the proxy host is a gateway; l4proxy intercepts port 80 on to-cl"
start_l4proxy "$gateway_policy"

say "what l4proxy installed: a mark rule, a table, tc programs (no iptables, no nft)"
show ip -n "$px" rule show
show ip -n "$px" route show table 244
show ip -n "$px" -6 route show table 244

say "the client connects to the server's own addresses, through the gateway"
: >"$work/nginx-access.log"
show ip netns exec "$cl" curl -sS --max-time 5 http://203.0.113.2/
show ip netns exec "$cl" curl -sS --max-time 5 "http://[2001:db8:5::2]/"
say "port 8080 is not in the policy: forwarded untouched"
show ip netns exec "$cl" curl -sS --max-time 5 http://203.0.113.2:8080/

say "what the server saw: the client's own address every time (fully transparent)"
cat "$work/nginx-access.log"
stop_l4proxy
show ip -n "$px" rule show
for family in -4 -6; do
    [[ -z $(ip -n "$px" "$family" rule show | grep 'lookup 244') && -z $(ip -n "$px" "$family" route show table 244 2>/dev/null) ]] ||
        { echo "unexpected: rules or routes left"; exit 1; }
done
echo "(no rules or routes of ours left; the tc programs went with the daemon's links)"

say "ACT 3: a bridge is put into the client's cable; l4proxy on it intercepts port 80"
# Deleting the client's link removes its routes too: they are added back as
# they were. Neither the client nor the router gets a route to the bridge.
ip netns add "$br"
ip -n "$br" link set lo up
ip netns exec "$br" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
# Bridged frames need no firewall here (l4proxy warns otherwise); the keys
# exist only while br_netfilter is loaded.
ip netns exec "$br" sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 2>/dev/null || true
ip -n "$cl" link del to-px
ip -n "$cl" link add to-px type veth peer name to-cl netns "$br"
ip -n "$br" link add to-px type veth peer name to-cl netns "$px"
ip -n "$cl" addr add 198.51.100.2/24 dev to-px
ip -n "$cl" addr add 2001:db8:c::2/64 dev to-px nodad
ip -n "$px" addr add 198.51.100.1/24 dev to-cl
ip -n "$px" addr add 2001:db8:c::1/64 dev to-cl nodad
for link in "$cl to-px" "$px to-cl" "$br to-cl" "$br to-px"; do
    set -- $link
    ip -n "$1" link set "$2" up
done
ip -n "$cl" route add 203.0.113.0/24 via 198.51.100.1
ip -n "$cl" route add 2001:db8:5::/64 via 2001:db8:c::1
show ip -n "$br" link add br0 type bridge
show ip -n "$br" link set to-cl master br0
show ip -n "$br" link set to-px master br0
show ip -n "$br" link set br0 up
show ip -n "$br" addr add 198.51.100.3/24 dev br0
show ip -n "$br" addr add 2001:db8:c::3/64 dev br0 nodad
show ip -n "$br" route add default via 198.51.100.1
show ip -n "$br" route add default via 2001:db8:c::1
start_l4proxy "$bridged_policy" "$br"

say "the client connects to the server's addresses, across the bridge"
: >"$work/nginx-access.log"
show ip netns exec "$cl" curl -sS --max-time 5 http://203.0.113.2/
show ip netns exec "$cl" curl -sS --max-time 5 "http://[2001:db8:5::2]/"
say "port 8080 is not in the policy: bridged untouched"
show ip netns exec "$cl" curl -sS --max-time 5 http://203.0.113.2:8080/

say "what the server saw: the client's own address every time"
cat "$work/nginx-access.log"
stop_l4proxy
say "the bridge forwards as before"
show ip netns exec "$cl" curl -sS --max-time 5 http://203.0.113.2:8080/

say "done: removing the lab"
