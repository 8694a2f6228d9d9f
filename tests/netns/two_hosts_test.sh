#!/usr/bin/env bash
# Two "hosts" on one machine: two network namespaces, each with its own UTS namespace (hostname),
# joined by a bridge; Open MPI over TCP with a hostfile and a launch agent that enters the
# namespace, so the cross-host paths (the host names, local ranks, the transport chosen across
# hosts) run before a cluster does.   two_hosts_test.sh CLI MPIEXEC WORKDIR
# Exit 0 pass, 1 fail, 77 skip (not root, or namespaces cannot be made here: said on stderr).
set -uo pipefail
cli=$1 mpiexec=$2 work=$3
tag=ra$$
br=${tag}br
state=/run/$tag
skip() { echo "SKIP: $*" >&2; exit 77; }
die() { echo "FAIL: $*" >&2; [ -f "$work/out.txt" ] && cut -c1-400 "$work/out.txt" >&2; exit 1; }

[ "$(id -u)" = 0 ] || skip "needs root to make network and UTS namespaces"
command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null ||
  skip "needs ip (iproute2), nsenter and unshare"

cleanup() {
  for h in a b; do
    ip netns del "${tag}$h" 2>/dev/null
    umount "$state/uts_$h" 2>/dev/null
  done
  ip link del "$br" 2>/dev/null
  umount "$state" 2>/dev/null
  rm -rf "$state"
}
trap cleanup EXIT
rm -rf "$work" && mkdir -p "$work" "$state"
# A private bind mount, so the namespace files can be bind-mounted under it.
mount --bind "$state" "$state" && mount --make-private "$state" || skip "cannot make a private mount in /run"
ip link add "$br" type bridge 2>/dev/null || skip "cannot create a bridge (no CAP_NET_ADMIN?)"
ip addr add 10.213.0.1/24 dev "$br" && ip link set "$br" up || skip "cannot configure the bridge"
n=2
for h in a b; do
  ns=${tag}$h
  ip netns add "$ns" 2>/dev/null || skip "ip netns add failed (network namespaces unavailable)"
  ip link add "${tag}v$h" type veth peer name eth0 netns "$ns" || skip "cannot create a veth pair"
  ip link set "${tag}v$h" master "$br" up
  ip -n "$ns" addr add "10.213.0.$n/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  touch "$state/uts_$h"
  unshare --uts="$state/uts_$h" hostname "ringattn-host-$h" || skip "cannot make a UTS namespace"
  n=$((n + 1))
done

# The launch agent: Open MPI calls it as `agent HOST COMMAND...` to start its daemon on HOST.
cat >"$work/agent.sh" <<AGENT
#!/usr/bin/env bash
host=\$1
shift
case \$host in
  10.213.0.2) h=a ;;
  10.213.0.3) h=b ;;
  *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
exec nsenter --net=/run/netns/${tag}\$h --uts=$state/uts_\$h -- sh -c "\$*"
AGENT
chmod +x "$work/agent.sh"
printf '10.213.0.2 slots=2\n10.213.0.3 slots=2\n' >"$work/hostfile"

echo "+ $mpiexec --hostfile $work/hostfile -np 4 (agent enters each namespace) $cli run --check" >&2
timeout -k 5 180 "$mpiexec" --allow-run-as-root --hostfile "$work/hostfile" -np 4 --map-by slot \
  --mca plm_rsh_agent "$work/agent.sh" --mca btl tcp,self --mca btl_tcp_if_include 10.213.0.0/24 \
  --mca oob_tcp_if_include 10.213.0.0/24 -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
  "$cli" run --backend cpu --seq-len 256 --heads 4 --kv-heads 2 --head-dim 16 --causal --check >"$work/out.txt" 2>&1
rc=$?
[ $rc -eq 0 ] || die "the two-host job exited $rc"
grep -qx PASS "$work/out.txt" || die "no PASS line"
grep -q "transport mpi" "$work/out.txt" || die "the CPU ring across hosts should use the MPI transport"
for r in 0 1; do grep -Eq "rank $r host ringattn-host-a " "$work/out.txt" || die "rank $r is not on ringattn-host-a"; done
for r in 2 3; do grep -Eq "rank $r host ringattn-host-b " "$work/out.txt" || die "rank $r is not on ringattn-host-b"; done
grep "host ringattn-host" "$work/out.txt" >&2
echo "PASS: 4 ranks on two namespaced hosts, hostnames and the MPI transport as on a cluster"
