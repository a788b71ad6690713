#!/usr/bin/env bash
# The pods of examples/local/cluster as network namespaces on this machine (run from the
# checkout, as root): shop-a (10.244.1.2), shop-c (10.244.1.3, running `fm-peer serve`: HTTP on
# 8080, a sink on 9000) and shop-waypoint (10.244.1.9), on a bridge fm-pods at 10.244.1.1/24.
# They reach only each other and this machine's 10.244.1.1 (no default route). `pods.sh down` removes them.
set -euo pipefail
pods=(shop-a:10.244.1.2 shop-c:10.244.1.3 shop-waypoint:10.244.1.9)
if [ "${1:-up}" = down ]; then
    for p in "${pods[@]}"; do
        name=${p%%:*}
        ip netns pids "$name" 2>/dev/null | xargs -r kill
        ip netns delete "$name" 2>/dev/null || true
    done
    ip link delete fm-pods 2>/dev/null || true
    exit 0
fi
ip link add fm-pods type bridge
ip addr add 10.244.1.1/24 dev fm-pods
ip link set fm-pods up
for p in "${pods[@]}"; do
    name=${p%%:*} addr=${p##*:}
    ip netns add "$name"
    ip link add "v-$name" type veth peer name eth0 netns "$name"
    ip link set "v-$name" master fm-pods up
    ip -n "$name" addr add "$addr/24" dev eth0
    ip -n "$name" link set eth0 up
    ip -n "$name" link set lo up
done
ip netns exec shop-c target/release/fm-peer serve > /dev/null &
