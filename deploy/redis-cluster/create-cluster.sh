#!/bin/sh
# Joins fresh Redis nodes into one Redis Cluster for Tessera, once: run it after the nodes start
# (compose runs it as a one-shot service, Kubernetes as a Job). On nodes that already form a
# cluster it only waits for the cluster to be healthy, so running it again is harmless.
#
#   REDIS_CLUSTER_NODES        the masters, "host:port host:port host:port" (at least 3)
#   REDIS_CLUSTER_REPLICAS     replicas per master (default 0; 1 needs twice the nodes)
#   REDIS_COORDINATOR_PASSWORD the tessera-coordinator ACL user's password (SECURITY.md):
#                              creating a cluster needs its admin commands
#   REDIS_CLUSTER_WAIT         seconds to wait for the nodes and for a healthy cluster (default 120)
set -eu

nodes=${REDIS_CLUSTER_NODES:?set REDIS_CLUSTER_NODES to the nodes, "host:port host:port host:port"}
replicas=${REDIS_CLUSTER_REPLICAS:-0}
wait_s=${REDIS_CLUSTER_WAIT:-120}
REDISCLI_AUTH=${REDIS_COORDINATOR_PASSWORD:?set REDIS_COORDINATOR_PASSWORD (the tessera-coordinator ACL user)}
export REDISCLI_AUTH

# redis-cli against one node as the coordinator's user: on HOST:PORT, the rest as arguments.
on() {
  node=$1
  shift
  redis-cli --no-auth-warning --user tessera-coordinator -h "${node%:*}" -p "${node##*:}" "$@"
}

# Runs CHECK (a shell command) every STEP seconds until it succeeds; after wait_s seconds,
# prints MESSAGE and exits 1.
wait_until() {
  check=$1 step=$2 message=$3 waited=0
  until eval "$check"; do
    if [ "$waited" -ge "$wait_s" ]; then
      echo "create-cluster: $message" >&2
      exit 1
    fi
    sleep "$step"
    waited=$((waited + step))
  done
}

# Every node answers PING (a node replaying a large AOF answers LOADING first).
for node in $nodes; do
  wait_until '[ "$(on "$node" ping 2>/dev/null)" = "PONG" ]' 2 \
    "$node did not answer PING within ${wait_s}s; check that it runs with --cluster-enabled yes and the ACL users of SECURITY.md"
done

first=${nodes%% *}
known=$(on "$first" cluster info | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')
if [ -z "$known" ]; then
  echo "create-cluster: $first is not a cluster node; start every node with --cluster-enabled yes" >&2
  exit 1
fi
if [ "$known" -gt 1 ]; then
  echo "create-cluster: the nodes already form a cluster ($known nodes); not creating it again"
else
  # shellcheck disable=SC2086 # the node list is split on purpose
  redis-cli --no-auth-warning --user tessera-coordinator --cluster create $nodes \
    --cluster-replicas "$replicas" --cluster-yes
fi

# Healthy means every node says cluster_state:ok (all 16384 slots served).
for node in $nodes; do
  wait_until 'on "$node" cluster info | tr -d "\r" | grep -qx "cluster_state:ok"' 1 \
    "$node does not report cluster_state:ok after ${wait_s}s; see 'redis-cli -h ${node%:*} -p ${node##*:} cluster info'"
done
echo "create-cluster: cluster healthy: $nodes"
