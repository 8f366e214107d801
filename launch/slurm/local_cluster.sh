#!/usr/bin/env bash
# Start a real SLURM cluster on this one machine, as root: slurmctld and two slurmd daemons
# acting as two virtual nodes (n1, n2), in a partition "debug". Used by .ci/run and the SLURM
# tests; also the quickest way to try `bertforge submit` without a cluster.
#
#   sudo launch/slurm/local_cluster.sh          # install (Debian's slurm-wlm, munge) if needed, start
#   sudo launch/slurm/local_cluster.sh stop     # stop the daemons
#
# Seen to work with Slurm 22.05 on Debian 12. Settings that matter: each slurmd has its own port
# and NodeAddr=127.0.0.1, the node names resolve through /etc/hosts, proctrack/linuxproc and
# task/none (no cgroups), no accounting (so sacct fails: use results and files, not sacct), and
# preempt_send_user_signal so that a preempted job gets the user signal submitit listens for.
set -euo pipefail

CONF_DIR=/etc/slurm
CPUS=${CPUS:-$(nproc)}
MEM_MB=${MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))}

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
}

if [[ "${1:-}" == "stop" ]]; then
    stop
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    echo "local_cluster.sh: run as root (it installs packages, writes $CONF_DIR and starts daemons)" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

for node in n1 n2; do
    grep -qE "[[:space:]]$node\$" /etc/hosts || echo "127.0.0.1 $node" >>/etc/hosts
done

# munge: a key readable by munge alone, and its daemon
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi

mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd-n1 /var/spool/slurmd-n2 /var/log/slurm
rm -f "$CONF_DIR/cgroup.conf"
cat >"$CONF_DIR/slurm.conf" <<EOF
# written by bertforge launch/slurm/local_cluster.sh
ClusterName=bertforge
SlurmctldHost=$(hostname)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
MinJobAge=600
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

stop
sleep 1
slurmctld
slurmd -N n1
slurmd -N n2

for _ in $(seq 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|allocated"; then
        scontrol update NodeName=n1,n2 State=RESUME 2>/dev/null || true
        sinfo
        exit 0
    fi
    sleep 1
done
echo "local_cluster.sh: the nodes did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
